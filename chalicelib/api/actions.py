"""What a person may do through the API, each validated, answered 404/409 with a reason when the
target is missing or in the wrong state, and audited (ok, or error with the reason).

- warm target / host min-max: an override within the pools file's limits (overrides.py);
- runner image: an override naming a full image reference (admin); or the image refresh's
  proposal approved (chalicelib/image_refresh.py: operator or admin), which sets the same
  override from the proposal and removes the proposal;
- drain a host: an idle serving host is retired (`HostStore.retire`: the scaler terminates a
  retiring host on its next run); a busy one gets `drain_requested_at` on its record, which its
  executor honours (it stops claiming and drains, as on SIGTERM);
- retire an idle runner: `retire_requested_at` on its record (only while `idle`), which the
  runner's executor honours (RunnerWatch retires it);
- retry a flagged job: `demand.redemand` (the next generation, sent), only for a job waiting
  for a runner that GitHub still has queued;
- redeliver a webhook delivery: GitHub's redelivery (`GitHubApp.redeliver`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chalicelib import dynamodb
from chalicelib.api import models
from chalicelib.api.audit import AuditLog, new_record
from chalicelib.api.auth import Identity
from chalicelib.api.errors import ApiError, Conflict, NotFound, Unavailable
from chalicelib.api.views import Views
from chalicelib.demand import DemandQueue, redemand
from chalicelib.dynamodb import to_attribute
from chalicelib.errors import DependencyUnavailable
from chalicelib.github.interface import GitHubError
from chalicelib.hosts import HostState, HostStore
from chalicelib.image_refresh import DynamoProposalStore, Proposal, ProposalStore
from chalicelib.jobs import WAITING_FOR_RUNNER, JobStore
from chalicelib.overrides import (
    FIELDS,
    OverrideRejected,
    OverrideStore,
    PoolOverrides,
    check_hosts,
    check_image,
    check_warm,
    effective,
    host_cap,
)
from chalicelib.runners import RunnerState

# A host's heartbeat must be this many of its intervals fresh for an idle host to be retired.
FRESH_BEATS = 2


@dataclass(frozen=True)
class Caller:
    identity: Identity
    source_ip: str | None = None
    user_agent: str | None = None


class Actions:
    def __init__(self, *, views: Views, audit: AuditLog, overrides: OverrideStore,
                 hosts: HostStore, jobs: JobStore, demand: DemandQueue, dynamodb_client: Any,
                 hosts_table: str, runners_table: str, github: Callable[[], Any] | None,
                 clock: Callable[[], float] = time.time,
                 proposals: ProposalStore | None = None) -> None:
        """`github`: builds the GitHub App client when first needed (None: not configured).
        `proposals`: the image refresh's proposals (None: the runners table's items)."""
        self._views = views
        self._audit = audit
        self._overrides = overrides
        self._hosts = hosts
        self._jobs = jobs
        self._demand = demand
        self._client = dynamodb_client
        self._hosts_table = hosts_table
        self._runners_table = runners_table
        self._github = github
        self._clock = clock
        self._proposals = proposals or DynamoProposalStore(dynamodb_client, runners_table)

    def _record(self, caller: Caller, action: str, target: str, outcome: str,
                reason: str | None = None, change: dict | None = None) -> None:
        identity = caller.identity
        self._audit.append(new_record(
            now=self._clock(), action=action, target=target, outcome=outcome, reason=reason,
            change=change, sub=identity.sub, username=identity.username,
            role=identity.role.value if identity.role else None, source_ip=caller.source_ip,
            user_agent=caller.user_agent))

    def _audited(self, caller: Caller, action: str, target: str,
                 act: Callable[[], tuple[Any, str | None, dict | None]]) -> Any:
        """Run `act` (-> (result, reason, change)); audit its outcome either way."""
        try:
            result, reason, change = act()
        except ApiError as exc:
            self._record(caller, action, target, "error", exc.message)
            raise
        except DependencyUnavailable as exc:
            self._record(caller, action, target, "error", f"dependency unavailable: {exc}")
            raise
        except GitHubError as exc:
            self._record(caller, action, target, "error", f"GitHub answered {exc.status}")
            raise Unavailable(f"GitHub answered {exc.status}: try again later") from exc
        self._record(caller, action, target, "ok", reason, change)
        return result

    # --- pools ---

    def set_warm(self, caller: Caller, pool_name: str, change: models.WarmChange
                 ) -> models.OverridesResult:
        def act():
            pool = self._views.pool(pool_name)
            try:
                check_warm(pool, change.warm_runners)
            except OverrideRejected as exc:
                raise Conflict(str(exc)) from exc
            return self._set(caller, pool_name, {"warm_runners": change.warm_runners})
        return self._audited(caller, "set_warm_target", f"pool:{pool_name}", act)

    def set_hosts(self, caller: Caller, pool_name: str, change: models.HostsChange
                  ) -> models.OverridesResult:
        def act():
            pool = self._views.pool(pool_name)
            low, high, _ = self._views.group_limits(pool_name)
            if high is None:  # no group to read: the most hosts the pool could use
                high = host_cap(pool, self._views.slots_of(pool_name))
            try:
                check_hosts(pool, change.min_hosts, change.max_hosts, low, high)
            except OverrideRejected as exc:
                raise Conflict(str(exc)) from exc
            return self._set(caller, pool_name, {"min_hosts": change.min_hosts,
                                                 "max_hosts": change.max_hosts})
        return self._audited(caller, "set_host_limits", f"pool:{pool_name}", act)

    def set_image(self, caller: Caller, pool_name: str, change: models.ImageChange
                  ) -> models.OverridesResult:
        """The reference was checked by the model (422); the pool must exist (404); the image
        must keep the pool's image policy (409: `check_image`)."""
        def act():
            try:
                check_image(self._views.pool(pool_name), change.image)
            except OverrideRejected as exc:
                raise Conflict(str(exc)) from exc
            return self._set(caller, pool_name, {"image": change.image})
        return self._audited(caller, "set_image", f"pool:{pool_name}", act)

    def image_proposal(self, pool_name: str) -> models.ImageProposal:
        self._views.pool(pool_name)  # 404 for an unknown pool
        found = self._proposals.get(pool_name)
        if found is None:
            raise NotFound(f"pool {pool_name} has no image proposal")
        return proposal_model(found)

    def approve_proposal(self, caller: Caller, pool_name: str, approval: models.ApproveProposal
                         ) -> models.OverridesResult:
        """Set the image override from the pool's proposal, if it is still `approval.digest`'s
        (409 otherwise: a newer proposal is never approved unseen), then remove it."""
        def act():
            pool = self._views.pool(pool_name)
            found = self._proposals.get(pool_name)
            if found is None:
                raise NotFound(f"pool {pool_name} has no image proposal")
            if found.digest != approval.digest:
                raise Conflict(f"pool {pool_name}'s proposal is {found.digest}, not "
                               f"{approval.digest}: read it again")
            try:
                check_image(pool, found.image)
            except OverrideRejected as exc:
                raise Conflict(str(exc)) from exc
            result, reason, diff = self._set(caller, pool_name, {"image": found.image})
            # Gone already (approved twice at once): the override is set either way.
            self._proposals.remove(pool_name, found.digest)
            return (result, f"{reason}; runner {found.runner_version}, proposed "
                    f"{found.found_at:.0f}", diff)
        return self._audited(caller, "approve_image_proposal", f"pool:{pool_name}", act)

    def _set(self, caller: Caller, pool_name: str, values: dict[str, int | str | None]):
        pool = self._views.pool(pool_name)
        before, after = self._overrides.set(pool_name, values, caller.identity.sub,
                                            self._clock())
        low, high, _ = self._views.group_limits(pool_name)
        eff = effective(pool, after, self._clock(), low, high)
        result = models.OverridesResult(pool=pool_name, overrides=_overrides_model(after),
                                        effective=models.Effective(**vars(eff)))
        diff: dict[str, int | str | None] = {}
        for name in FIELDS:
            if name in values:
                diff[f"{name}_before"] = getattr(before, name)
                diff[f"{name}_after"] = getattr(after, name)
        return result, f"version {after.version}", diff

    # --- hosts ---

    def drain_host(self, caller: Caller, host_id: str) -> models.ActionResult:
        def act():
            host = self._hosts.get(host_id)
            if host is None:
                raise NotFound(f"no host {host_id}")
            if host.state is not HostState.SERVING:
                raise Conflict(f"host {host_id} is {host.state.value}: only a serving host is "
                               "drained")
            now = self._clock()
            fresh_after = now - FRESH_BEATS * max(host.heartbeat_s, 1.0)
            if host.slots_busy == 0 and self._hosts.retire(
                    host_id, now, fresh_after, by=f"api:{caller.identity.sub}"):
                return (models.ActionResult(
                    action="drain_host", target=host_id, outcome="retiring",
                    detail="idle: retiring (the scaler terminates it on its next run)"),
                    "retiring", None)
            if not self._request(self._hosts_table, {"host_id": {"S": host_id}},
                                 "drain_requested", caller, "#state = :serving",
                                 {":serving": {"S": HostState.SERVING.value}}):
                found = self._hosts.get(host_id)
                state = found.state.value if found else "gone"
                raise Conflict(f"host {host_id} is {state}: only a serving host is drained")
            return (models.ActionResult(
                action="drain_host", target=host_id, outcome="drain_requested",
                detail="busy: its executor stops claiming and lets its jobs finish"),
                "drain_requested", None)
        return self._audited(caller, "drain_host", f"host:{host_id}", act)

    def _request(self, table: str, key: dict, what: str, caller: Caller, condition: str,
                 values: dict) -> bool:
        """Stamp `<what>_at`/`<what>_by` on an item, only while `condition` holds."""
        return dynamodb.conditional(
            self._client.update_item, TableName=table, Key=key,
            UpdateExpression=f"SET {what}_at = if_not_exists({what}_at, :now), {what}_by = :by",
            ConditionExpression=condition, ExpressionAttributeNames={"#state": "state"},
            ExpressionAttributeValues=values | {":now": to_attribute(self._clock()),
                                                ":by": {"S": caller.identity.sub}},
        ) is not None

    # --- runners ---

    def retire_runner(self, caller: Caller, name: str) -> models.ActionResult:
        def act():
            if name.startswith(("seats#", "overrides#", "proposal#")):
                raise NotFound(f"no runner {name}")
            if not self._request(self._runners_table, {"runner_name": {"S": name}},
                                 "retire_requested", caller, "#state = :idle",
                                 {":idle": {"S": RunnerState.IDLE.value}}):
                found = dynamodb.get(self._client, self._runners_table,
                                     {"runner_name": {"S": name}})
                if found is None:
                    raise NotFound(f"no runner {name}")
                raise Conflict(f"runner {name} is {found.get('state')}: only an idle runner "
                               "is retired")
            return (models.ActionResult(
                action="retire_runner", target=name, outcome="retire_requested",
                detail="its executor deregisters and stops it"), "retire_requested", None)
        return self._audited(caller, "retire_runner", f"runner:{name}", act)

    # --- jobs ---

    def retry_job(self, caller: Caller, job_id: int) -> models.ActionResult:
        def act():
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.state not in WAITING_FOR_RUNNER:
                raise Conflict(f"job {job_id} is {job.state.value}: only a job waiting for a "
                               "runner is re-demanded")
            if not (job.model_extra or {}).get("flagged"):
                raise Conflict(f"job {job_id} is not flagged: its executor re-demands it "
                               "itself (with backoff)")
            github = self._github_client("a retry asks GitHub whether the job is queued")
            try:
                status = github.get_job(int(job.installation_id or 0), str(job.repository),
                                        job_id).get("status")
            except GitHubError as exc:
                if exc.status != 404:
                    raise
                # GitHub's answer, not an outage: "try again later" would never succeed.
                raise Conflict(f"GitHub has no job {job_id} in {job.repository}: not "
                               "re-demanded") from exc
            if status != "queued":
                raise Conflict(f"GitHub reports job {job_id} {status}: not re-demanded")
            moved = redemand(self._jobs, self._demand, job, self._clock(),
                             reason=f"operator:{caller.identity.sub}",
                             fields={"flagged": False, "start_failures": 0})
            if not moved.applied:
                raise Conflict(f"job {job_id} moved on meanwhile ({moved.state}): not "
                               "re-demanded")
            return (models.ActionResult(
                action="retry_job", target=str(job_id), outcome="redemanded",
                detail=f"generation {moved.generation}"), f"generation {moved.generation}",
                {"generation_before": job.demand_generation,
                 "generation_after": moved.generation})
        return self._audited(caller, "retry_job", f"job:{job_id}", act)

    # --- webhooks ---

    def redeliver(self, caller: Caller, delivery_id: int) -> models.ActionResult:
        def act():
            github = self._github_client("a redelivery is GitHub's")
            if not github.redeliver(delivery_id):
                raise NotFound(f"GitHub has no delivery {delivery_id} (older than its "
                               "retention, or never made)")
            return (models.ActionResult(action="redeliver", target=str(delivery_id),
                                        outcome="redelivered"), "redelivered", None)
        return self._audited(caller, "redeliver", f"delivery:{delivery_id}", act)

    def _github_client(self, why: str) -> Any:
        if self._github is None:
            raise Unavailable(f"no GitHub App configured: {why}")
        return self._github()


def proposal_model(found: Proposal) -> models.ImageProposal:
    return models.ImageProposal(
        pool=found.pool, image=found.image, repository=found.repository, digest=found.digest,
        runner_version=found.runner_version, found_at=found.found_at,
        scan=models.ScanSummary(counts=dict(found.scan_counts), status=found.scan_status),
        current_image=found.current_image)


def _overrides_model(value: PoolOverrides) -> models.Overrides:
    return models.Overrides(**vars(value))
