"""What the reconciler remembers between runs (one JSON document in its lease item)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from chalicelib.reconciler.deliveries import DeliveryCursor, Pending
from chalicelib.reconciler.discovery import DiscoveryState


@dataclass(frozen=True)
class ReconcilerState:
    """`app_cursors`: each App's delivery cursor, by App id (each App has its own webhook and
    delivery log; reordering the Apps moves no cursor). `deliveries`: the one cursor of state
    written before several Apps, read once as the first App's. `discovery` is per owner."""

    deliveries: DeliveryCursor = field(default_factory=DeliveryCursor)
    offline_since: Mapping[str, float] = field(default_factory=dict)
    app_cursors: Mapping[int, DeliveryCursor] = field(default_factory=dict)
    discovery: Mapping[str, DiscoveryState] = field(default_factory=dict)

    def to_json(self) -> str:
        cursor = self.deliveries
        return json.dumps(
            {
                "v": 1,
                **_cursor_json(cursor),
                "offline_since": dict(self.offline_since),
                "apps": {str(app): _cursor_json(c) for app, c in self.app_cursors.items()},
                "discovery": {owner: d.to_dict() for owner, d in self.discovery.items()},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> ReconcilerState:
        """The stored state; an unreadable one starts afresh (the lookback bounds the cost)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            cursor = _cursor_from(data)
            offline = {str(k): float(v) for k, v in dict(data.get("offline_since", {})).items()}
            apps = {int(k): _cursor_from(v) for k, v in dict(data.get("apps", {})).items()}
            discovery = {
                str(k): DiscoveryState.from_dict(v)
                for k, v in dict(data.get("discovery", {})).items()
            }
        except (ValueError, TypeError, AttributeError, KeyError):
            return cls()
        return cls(cursor, offline, apps, discovery)

    def cursor_of(self, app_id: int, first: bool = False) -> DeliveryCursor:
        """An App's delivery cursor; the first configured App without one of its own takes the
        cursor of state written before several Apps (empty once migrated)."""
        if app_id in self.app_cursors:
            return self.app_cursors[app_id]
        return self.deliveries if first else DeliveryCursor()

    def with_cursor(self, app_id: int, cursor: DeliveryCursor) -> ReconcilerState:
        return replace(self, deliveries=DeliveryCursor(),
                       app_cursors={**self.app_cursors, app_id: cursor})

    def with_discovery(self, owner: str, discovery: DiscoveryState) -> ReconcilerState:
        return replace(self, discovery={**self.discovery, owner: discovery})

    def with_offline(self, offline_since: Mapping[str, float]) -> ReconcilerState:
        return replace(self, offline_since=dict(offline_since))


def _cursor_json(cursor: DeliveryCursor) -> dict[str, Any]:
    return {
        "floor_id": cursor.floor_id,
        "resume": cursor.resume,
        "resume_top": cursor.resume_top,
        "pending": [[p.guid, p.delivery_id, p.first_seen] for p in cursor.pending],
    }


def _cursor_from(data: Mapping[str, Any]) -> DeliveryCursor:
    return DeliveryCursor(
        floor_id=int(data.get("floor_id", 0)),
        resume=data.get("resume"),
        resume_top=int(data.get("resume_top", 0)),
        pending=tuple(
            Pending(str(guid), int(delivery_id), float(first))
            for guid, delivery_id, first in data.get("pending", [])
        ),
    )
