"""The instance metadata service (IMDSv2): one narrow client for what the daemon reads.

The instance id (the host id; hostnames come from private IPs, which EC2 reuses), the Auto
Scaling target lifecycle state and the Spot interruption notice (executor/lifecycle.py); the
last two are absent (404) until they are set, which `get()` answers with None.

IMDSv2 only: a session token from `PUT /latest/api/token` (TTL header), sent on every read. The
launch template requires tokens with hop limit 1, so runner containers (one hop further) get no
token. Every call has short timeouts and a bounded number of attempts (urllib3's Retry):
an unreachable IMDS costs at most about `attempts x 2 x timeout_s`, then `ImdsUnavailable`.
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-IMDS-existing-instances.html
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from chalicelib.errors import DependencyUnavailable

DEFAULT_ENDPOINT = "http://169.254.169.254"
# Names and paths, not secrets (S105).
TOKEN_PATH = "/latest/api/token"  # noqa: S105
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
# IMDS accepts a token TTL of 1 s to 6 h.
MAX_TOKEN_TTL_S = 21600
INSTANCE_ID = "/latest/meta-data/instance-id"
# The Auto Scaling target lifecycle state: "InService", "Terminated", "Warmed:*"; and the Spot
# notice, JSON {"action": "terminate"|"stop"|"hibernate", "time": "..."}; both 404 until set.
# https://docs.aws.amazon.com/autoscaling/ec2/userguide/retrieving-target-lifecycle-state-through-imds.html
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/spot-instance-termination-notices.html
TARGET_LIFECYCLE_STATE = "/latest/meta-data/autoscaling/target-lifecycle-state"
SPOT_INSTANCE_ACTION = "/latest/meta-data/spot/instance-action"
# EC2 instance ids: "i-" and 8 (older) or 17 hex digits.
INSTANCE_ID_PATTERN = re.compile(r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})")
# Throttling (IMDS answers 429 when called too often) and server errors are worth a retry.
RETRY_STATUSES = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class SpotNotice:
    """A Spot interruption notice: `action` (terminate, stop, hibernate: each ends the host's
    work) at `at` (epoch seconds; None when the notice's time could not be read: treat it as
    now). `raw` is the body, for the log."""

    action: str
    at: float | None
    raw: str = ""


def parse_spot_notice(body: str) -> SpotNotice:
    """The notice IMDS serves at SPOT_INSTANCE_ACTION. A body that is not the documented JSON
    is still a notice (the path exists only when one was issued): action `unknown`, time None."""
    try:
        doc = json.loads(body)
    except ValueError:
        return SpotNotice("unknown", None, body[:200])
    if not isinstance(doc, dict):
        return SpotNotice("unknown", None, body[:200])
    action = doc.get("action") if isinstance(doc.get("action"), str) else "unknown"
    at = None
    if isinstance(doc.get("time"), str):
        try:
            at = datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            at = None
    return SpotNotice(action, at, body[:200])


class ImdsUnavailable(DependencyUnavailable):
    """IMDS did not answer in time, refused the token, or answered something unexpected."""

    def __init__(self, message: str) -> None:
        super().__init__("IMDS", message)


class Imds:
    """IMDSv2 reads with a cached session token. `endpoint` e.g. http://169.254.169.254 (no
    path); the local stack points it at devstack/imds.py."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout_s: float = 1.0,
        attempts: int = 3,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not endpoint:
            raise ValueError("IMDS endpoint is empty (IMDS disabled)")
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token TTL must be 1..{MAX_TOKEN_TTL_S} s, not {token_ttl_s}")
        if attempts < 1 or timeout_s <= 0:
            raise ValueError("IMDS needs attempts >= 1 and timeout_s > 0")
        self.endpoint = endpoint.rstrip("/")
        self._timeout = (timeout_s, timeout_s)  # connect, read
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        retry = Retry(
            total=attempts - 1,
            status_forcelist=RETRY_STATUSES,
            allowed_methods=None,  # PUT too: asking for a token has no side effect
            backoff_factor=0.1,
            backoff_max=1.0,
            respect_retry_after_header=False,
            raise_on_status=False,
        )
        self._session = requests.Session()
        # No proxy may see the token or the role's credentials: IMDS is link-local.
        self._session.trust_env = False
        self._session.mount("http://", HTTPAdapter(max_retries=retry))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Imds:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def instance_id(self) -> str:
        value = self.get(INSTANCE_ID)
        if value is None or not INSTANCE_ID_PATTERN.fullmatch(value.strip()):
            raise ImdsUnavailable(
                f"{self.endpoint}{INSTANCE_ID} answered {value!r:.80}, not an instance id")
        return value.strip()

    def target_lifecycle_state(self) -> str | None:
        """E.g. "InService", "Terminated"; None when the instance is in no Auto Scaling group."""
        value = self.get(TARGET_LIFECYCLE_STATE)
        return value.strip() if value is not None else None

    def spot_notice(self) -> SpotNotice | None:
        """The Spot interruption notice, or None (not Spot, or no interruption planned)."""
        value = self.get(SPOT_INSTANCE_ACTION)
        return parse_spot_notice(value) if value is not None else None

    def get(self, path: str) -> str | None:
        """The text at `path` (e.g. INSTANCE_ID), or None when IMDS answers 404 (not set).
        A rejected token (401: expired early, IMDS restarted) is renewed once."""
        for renewed in (False, True):
            response = self._request("GET", path, headers={TOKEN_HEADER: self._session_token()})
            if response.status_code == 401 and not renewed:
                self._token = None
                continue
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise ImdsUnavailable(f"GET {path}: HTTP {response.status_code}")
            return response.text
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns

    def _session_token(self) -> str:
        # Renew a minute early (or halfway, for short TTLs) so a read never carries an expired one.
        if self._token is None or self._clock() >= self._token_expires:
            response = self._request(
                "PUT", TOKEN_PATH, headers={TOKEN_TTL_HEADER: str(self._token_ttl_s)})
            if response.status_code != 200 or not response.text:
                raise ImdsUnavailable(f"PUT {TOKEN_PATH}: HTTP {response.status_code}")
            self._token = response.text
            margin = min(60.0, self._token_ttl_s / 2)
            self._token_expires = self._clock() + self._token_ttl_s - margin
        return self._token

    def _request(self, method: str, path: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self._session.request(
                method, self.endpoint + path, headers=headers, timeout=self._timeout,
                allow_redirects=False)
        except requests.RequestException as exc:
            # Refused, timed out, retries exhausted: urllib3's MaxRetryError carries the last
            # cause; say that, not a traceback.
            reason = exc.args[0] if exc.args else exc
            reason = getattr(reason, "reason", None) or reason
            raise ImdsUnavailable(f"{method} {self.endpoint}{path}: {type(reason).__name__}: "
                                  f"{reason}"[:300]) from exc
