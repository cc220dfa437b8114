"""Docker's own record of RunnerHub's containers, streamed live.

dockerd keeps only a short ring of past events, so reading them after a busy run loses some;
a live stream from the start of the run keeps every one."""

from __future__ import annotations

import threading
import time


class DockerEventLog:
    """Records `event` events of one host's runner containers: name -> (time, image)."""

    def __init__(self, client, event: str, host_id: str) -> None:
        self._stream = client.events(
            since=int(time.time()) - 1, decode=True,
            filters={"type": "container", "event": event,
                     "label": ["runnerhub.managed=true", f"runnerhub.host={host_id}"]},
        )
        self.seen: dict[str, tuple[float, str]] = {}
        self._thread = threading.Thread(target=self._read, name="docker-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                attributes = event["Actor"]["Attributes"]
                self.seen.setdefault(attributes["runnerhub.runner"],
                                     (event["timeNano"] / 1e9, attributes["image"]))
        except Exception:  # noqa: BLE001,S110 - the stream ends when closed
            pass

    def close(self) -> dict[str, tuple[float, str]]:
        time.sleep(0.5)  # let the last events arrive
        self._stream.close()
        self._thread.join(timeout=5)
        return dict(self.seen)


class ContainerTimeline:
    """Every `start` and `die` of RunnerHub's runner containers on the given hosts (all hosts
    when None), in Docker's order, as `devstack.judge.ContainerEvent`s: the over-commit judge
    replays them."""

    def __init__(self, client, hosts: list[str] | None = None) -> None:
        from devstack.judge import ContainerEvent

        self._event = ContainerEvent
        self._hosts = set(hosts) if hosts is not None else None
        self._stream = client.events(
            since=int(time.time()) - 1, decode=True,
            filters={"type": "container", "event": ["start", "die"],
                     "label": ["runnerhub.managed=true"]},
        )
        self.events: list = []
        self._thread = threading.Thread(target=self._read, name="docker-timeline", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                host = event["Actor"]["Attributes"].get("runnerhub.host", "")
                if self._hosts is not None and host not in self._hosts:
                    continue
                self.events.append(self._event(
                    time=event["timeNano"] / 1e9, host=host, container=event["Actor"]["ID"],
                    action=event.get("Action") or event.get("status", "")))
        except Exception:  # noqa: BLE001,S110 - the stream ends when closed
            pass

    def close(self) -> list:
        time.sleep(0.5)  # let the last events arrive
        self._stream.close()
        self._thread.join(timeout=5)
        return list(self.events)
