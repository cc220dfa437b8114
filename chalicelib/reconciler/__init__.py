"""The reconciler: repairs what webhooks and executors leave undone, once a minute.

Planners (pure, frozen dataclasses out): `deliveries` (lost webhooks), `stuck` (stuck jobs),
`dead_letters`, `orphans` (orphan runners), `discovery` (queued jobs GitHub never announced),
with `policy` (thresholds, budgets) and `state` (what a run leaves for the next). The one class
that acts on them is `service.Reconciler` (its lost-webhook and discovery steps in `redelivery`
and `sweep`); `store` is what it keeps in DynamoDB, `settings` its configuration, and
`__main__` the command line (`python -m chalicelib.reconciler`).
"""

from chalicelib.reconciler.common import ReconcileSummary
from chalicelib.reconciler.policy import DEFAULT_POLICY, Policy
from chalicelib.reconciler.service import Reconciler
from chalicelib.reconciler.state import ReconcilerState

__all__ = ["DEFAULT_POLICY", "Policy", "ReconcileSummary", "Reconciler", "ReconcilerState"]
