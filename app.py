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


@app.lambda_function(name="scaler")
def scale(event, context) -> dict:
    """Hosts per pool (chalicelib/scaler/): a plain Lambda handler, because one function takes
    two kinds of event that Chalice's decorators would each wrap in their own type: the jobs
    table's stream (new demand, debounced) and a schedule (whatever the stream missed). Both
    event sources are attached by infra/runnerhub_infra/control_plane.py, where the stream's
    ARN exists. Imported here, not at the top: the webhook's cold start does not pay for it."""
    from chalicelib.scaler.handler import handle

    return handle(event, context)
