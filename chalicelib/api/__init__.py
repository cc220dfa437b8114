"""The management API's logic (routes in `api_app.py`). Nothing here is imported by the webhook:
the API is its own Lambda function, so the webhook keeps its import time."""
