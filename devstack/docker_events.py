"""Docker's own record of RunnerHub's containers, streamed live.

dockerd keeps only a short ring of past events, so reading them after a busy run loses some;
a live stream from the start of the run keeps every one. A stream that breaks before `close()`
is an error (`close()` raises it): a judge reading a silently truncated record could not fail.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class EventStream:
    """Container events of RunnerHub's runner containers (`events`, and for one host only
    when `host_id` is given), read on a thread from now on; `on_event` sees each in order."""

    def __init__(self, client, events: list[str], host_id: str | None = None) -> None:
        labels = ["runnerhub.managed=true"]
        if host_id is not None:
            labels.append(f"runnerhub.host={host_id}")
        self._stream = client.events(since=int(time.time()) - 1, decode=True,
                                     filters={"type": "container", "event": events,
                                              "label": labels})
        self._closing = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def on_event(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.on_event(event)
        except Exception as exc:  # noqa: BLE001 - kept for close(), unless we closed it
            if not self._closing:
                self.error = exc

    def _close(self) -> None:
        time.sleep(0.5)  # let the last events arrive
        self._closing = True
        self._stream.close()
        self._thread.join(timeout=5)
        if self.error is not None:
            raise RuntimeError(f"Docker's event stream broke: {self.error!r}") from self.error


class DockerEventLog(EventStream):
    """The first `event` of each of one host's runner containers: name -> (time, image)."""

    def __init__(self, client, event: str, host_id: str) -> None:
        self.seen: dict[str, tuple[float, str]] = {}
        super().__init__(client, [event], host_id)

    def on_event(self, event: dict[str, Any]) -> None:
        attributes = event["Actor"]["Attributes"]
        self.seen.setdefault(attributes["runnerhub.runner"],
                             (event["timeNano"] / 1e9, attributes["image"]))

    def close(self) -> dict[str, tuple[float, str]]:
        self._close()
        return dict(self.seen)


class ContainerTimeline(EventStream):
    """Every `start`, `kill` and `die` of RunnerHub's runner containers on the given hosts (all
    hosts when None), in Docker's order, as `devstack.judge.ContainerEvent`s: the over-commit
    judge replays starts and dies, the scale-in judge looks for kills of busy runners."""

    def __init__(self, client, hosts: list[str] | None = None) -> None:
        from devstack.judge import ContainerEvent

        self._event = ContainerEvent
        self._hosts = set(hosts) if hosts is not None else None
        self.events: list = []
        super().__init__(client, ["start", "kill", "die"])

    def on_event(self, event: dict[str, Any]) -> None:
        attributes = event["Actor"]["Attributes"]
        host = attributes.get("runnerhub.host", "")
        if self._hosts is None or host in self._hosts:
            self.events.append(self._event(
                time=event["timeNano"] / 1e9, host=host, container=event["Actor"]["ID"],
                action=event.get("Action") or event.get("status", ""),
                runner=attributes.get("runnerhub.runner", "")))

    def close(self) -> list:
        self._close()
        return list(self.events)
