"""RunnerHub's Chalice app: routes and wiring only; the logic is in chalicelib."""

from chalice import Chalice, Rate, Response

from chalicelib import wiring
from chalicelib.webhook import WebhookRequest, logger

app = Chalice(app_name="runnerhub")

WEBHOOK_CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded"]


@app.route("/webhook", methods=["POST"], content_types=WEBHOOK_CONTENT_TYPES)
def webhook() -> Response:
    request = app.current_request
    headers = {name.lower(): value for name, value in request.headers.items()}
    try:
        result = wiring.webhook_service().handle(
            WebhookRequest(
                headers=headers,
                body=request.raw_body or b"",
                content_type=headers.get("content-type", "application/json"),
            )
        )
    except Exception:  # noqa: BLE001 - last resort: a logged 500 with no stack in the body
        logger.exception("unhandled error in webhook")
        return Response({"error": "internal_error"}, status_code=500)
    finally:
        wiring.telemetry().flush()
    return Response(result.body, status_code=result.status)


@app.schedule(Rate(1, unit=Rate.MINUTES))
def reconcile(event) -> dict:
    """Lost webhooks, stuck jobs, orphan runners (chalicelib/reconciler/)."""
    return wiring.reconciler().run().as_dict()
