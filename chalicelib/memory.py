"""In-memory stores: the same interfaces and conditions as the DynamoDB and SQS ones, on dicts
under a lock. For unit tests and in-process benchmarks only; no production module imports this.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from chalicelib.deliveries import DONE, FAILED, PROCESSING
from chalicelib.demand import DeadLetter, DemandMessage
from chalicelib.hosts import KEPT_STATES, Heartbeat, HostNotServing, HostRecord, HostState
from chalicelib.jobs import (
    CLAIM_STATES,
    NO_CHANGE,
    WAITING_FOR_RUNNER,
    Change,
    JobRecord,
    JobState,
    Move,
    Transition,
)
from chalicelib.reconciler.deliveries import Mark
from chalicelib.reconciler.state import ReconcilerState
from chalicelib.runners import (
    ALLOWED_FROM,
    BEFORE_BUSY,
    NoSeat,
    RunnerExists,
    RunnerRecord,
    RunnerState,
    Seats,
)

# --- jobs -----------------------------------------------------------------------------------------


class InMemoryJobStore:
    """Same moves and conditions as DynamoJobStore, on a dict under a lock; records are built
    from the stored dicts as the DynamoDB store builds them from items."""

    def __init__(self) -> None:
        self._jobs: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def apply(
        self,
        job_id: int,
        move: Move,
        now: float,
        change: Change = NO_CHANGE,
        *,
        generation: int | None = None,
        host_id: str | None = None,
    ) -> Transition:
        with self._lock:
            current = self._jobs.get(job_id)
            found = JobRecord.model_validate(current) if current else None
            if not _allowed(move, found, generation, host_id, now):
                return Transition(False, found)
            job = dict(current) if current else {"job_id": job_id}
            if move.to is not None:
                job["state"] = move.to.value
            if not (move.stamp_once and move.stamp in job):
                job[move.stamp] = round(now, 3)
            job["updated_at"] = round(now, 3)
            if move.bumps_generation:
                job["demand_generation"] = job.get("demand_generation", 0) + 1
            for name, value in change.facts.items():
                if value is not None:
                    job.setdefault(name, _plain(value))
            for name, value in change.fields.items():
                if value is not None:
                    job[name] = _plain(value)
            for name in move.removes:
                job.pop(name, None)
            self._jobs[job_id] = job
            return Transition(True, JobRecord.model_validate(job))

    def get(self, job_id: int) -> JobRecord | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return JobRecord.model_validate(job) if job else None

    def all(self) -> list[JobRecord]:
        with self._lock:
            return [JobRecord.model_validate(job) for job in self._jobs.values()]


def _allowed(move: Move, found: JobRecord | None, generation: int | None,
             host_id: str | None, now: float) -> bool:
    """The condition DynamoJobStore writes (`jobs.build_update`), checked on the record."""
    if found is None:
        return move.may_create
    if found.state not in move.from_states:
        return False
    if move.needs_generation and found.demand_generation != generation:
        return False
    if move.needs_host and found.host_id != host_id:
        return False
    if move.needs_no_stamp and (found.model_extra or {}).get(move.stamp) is not None:
        return False
    lease = found.lease_until
    return not (move.needs_expired_lease and lease is not None and lease >= now)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float):
        return round(value, 3)
    return value


# --- runners --------------------------------------------------------------------------------------


class InMemoryRunnerStore:
    """Same conditions as DynamoRunnerStore, seats included (one lock: each seat change is one
    step with its record's, as the transaction is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}
        self.seat_counts: dict[str, dict[str, int]] = {}

    def _count(self, pool: str) -> dict[str, int]:
        return self.seat_counts.setdefault(pool, {"runners": 0, "warm": 0})

    def move(self, name: str, to: RunnerState, now: float, **fields: Any) -> RunnerRecord | None:
        with self._lock:
            record = self.records.get(name)
            state = RunnerRecord.model_validate(record).state if record else None
            if (state is None and ALLOWED_FROM[to]) or (
                state is not None and state not in ALLOWED_FROM[to]
            ):
                return None
            record = dict(record or {"runner_name": name})
            record.update({k: v for k, v in fields.items() if v is not None})
            record.update({"state": to.value, f"{to.value}_at": now})
            if to is RunnerState.GONE and record.pop("seat", None):
                count = self._count(record.get("pool") or "")
                count["runners"] -= 1
                if record.pop("warm", None):
                    count["warm"] -= 1
            self.records[name] = record
            return RunnerRecord.model_validate(record)

    def start(self, name: str, now: float, *, pool: str, max_runners: int,
              warm_limit: int | None = None, **fields: Any) -> RunnerRecord:
        with self._lock:
            if name in self.records:
                raise RunnerExists(f"runner {name} exists already")
            count = self._count(pool)
            if count["runners"] >= max_runners or (
                    warm_limit is not None and count["warm"] >= warm_limit):
                raise NoSeat(pool, "warm" if warm_limit is not None else "runner")
            record = {k: v for k, v in fields.items() if v is not None}
            record.update(runner_name=name, state=RunnerState.STARTING.value,
                          starting_at=now, pool=pool, seat=True)
            count["runners"] += 1
            if warm_limit is not None:
                record.update(warm=True, warm_at=now)
                count["warm"] += 1
            self.records[name] = record
            return RunnerRecord.model_validate(record)

    def make_warm(self, name: str, pool: str, warm_limit: int, now: float) -> bool:
        with self._lock:
            record = self.records.get(name)
            count = self._count(pool)
            if (not record or record.get("state") not in BEFORE_BUSY or not record.get("seat")
                    or record.get("warm") or record.get("pool") != pool
                    or count["warm"] >= warm_limit):
                return False
            record["warm_from_job"] = record.pop("job_id", 0)
            record.pop("generation", None)
            record.update(warm=True, warm_at=now)
            count["warm"] += 1
            return True

    def take_warm(self, name: str, now: float) -> bool:
        with self._lock:
            record = self.records.get(name)
            if not record or not record.pop("warm", None):
                return False
            record["warm_taken_at"] = now
            self._count(record.get("pool") or "")["warm"] -= 1
            return True

    def unwarm(self, name: str, keep: int, now: float) -> bool:
        with self._lock:
            record = self.records.get(name)
            if (not record or not record.get("warm") or record.get("state") != "idle"
                    or self._count(record.get("pool") or "")["warm"] <= keep):
                return False
            del record["warm"]
            record["unwarmed_at"] = now
            self._count(record.get("pool") or "")["warm"] -= 1
            return True

    def seats(self, pool: str) -> Seats:
        with self._lock:
            return Seats(**self._count(pool))

    def reassign(self, name: str, from_job: int, to_job: int, generation: int, now: float
                 ) -> bool:
        with self._lock:
            record = self.records.get(name)
            found = RunnerRecord.model_validate(record) if record else None
            if not found or found.state not in BEFORE_BUSY or found.job_id != from_job:
                return False
            record.update(job_id=to_job, generation=generation, reassigned_at=now)
            return True

    def get(self, name: str) -> RunnerRecord | None:
        with self._lock:
            record = self.records.get(name)
            return RunnerRecord.model_validate(record) if record else None

    def on_host(self, host_id: str) -> list[RunnerRecord]:
        with self._lock:
            return [RunnerRecord.model_validate(r) for r in self.records.values()
                    if r.get("host_id") == host_id]


# --- hosts ----------------------------------------------------------------------------------------


class InMemoryHostStore:
    """Same conditions as DynamoHostStore. A claim holds this store's lock while it moves the
    job (`InMemoryJobStore.apply`), so it is one step against a retirement, as the
    transaction is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: dict[str, dict[str, Any]] = {}

    def beat(self, heartbeat: Heartbeat, now: float) -> HostState:
        with self._lock:
            fields = heartbeat.item(now)
            record = self.records.setdefault(heartbeat.host_id, {})
            if heartbeat.clean is None:
                record.pop("clean", None)
            found = HostState(record["state"]) if "state" in record else None
            new_incarnation = record.get("started_at") != heartbeat.started_at
            if found in KEPT_STATES and not (found is HostState.LOST and new_incarnation):
                fields["state"] = found.value
            else:
                record.pop("lost_at", None)
                record.pop("lost_by", None)
            record.update(fields)
            return HostState(record["state"])

    def get(self, host_id: str) -> HostRecord | None:
        with self._lock:
            record = self.records.get(host_id)
            return HostRecord.model_validate(record) if record else None

    def all(self) -> list[HostRecord]:
        with self._lock:
            return [HostRecord.model_validate(record) for record in self.records.values()]

    def mark_lost(self, host_id: str, seen_heartbeat_at: float, now: float, by: str) -> bool:
        with self._lock:
            record = self.records.get(host_id)
            if not record or record.get("heartbeat_at") != seen_heartbeat_at:
                return False
            record.update(state=HostState.LOST.value, lost_at=now, lost_by=by)
            return True

    def claim(self, claimant: str, jobs: InMemoryJobStore, job_id: int, move: Move,
              now: float, change: Change = NO_CHANGE, *, generation: int | None = None,
              host_id: str | None = None) -> Transition:
        with self._lock:
            record = self.records.get(claimant)
            if not record or record.get("state") != HostState.SERVING.value:
                state = record.get("state") if record else None
                raise HostNotServing(claimant, HostState(state) if state else None)
            moved = jobs.apply(job_id, move, now, change, generation=generation,
                               host_id=host_id)
            if moved.applied:
                record["claims"] = record.get("claims", 0) + 1
                record["last_claim_at"] = round(now, 3)
            return moved

    def retire(self, host_id: str, now: float, fresh_after: float, by: str) -> bool:
        with self._lock:
            record = self.records.get(host_id)
            if not record or record.get("state") != HostState.SERVING.value:
                return False
            beat_at = record.get("heartbeat_at", 0.0)
            last_claim = record.get("last_claim_at")
            if (record.get("slots_busy") != 0 or beat_at < fresh_after
                    or (last_claim is not None and last_claim >= beat_at)):
                return False
            record.update(state=HostState.RETIRING.value, retiring_at=now, retiring_by=by)
            return True

    def unretire(self, host_id: str, now: float) -> bool:
        with self._lock:
            record = self.records.get(host_id)
            if not record or record.get("state") != HostState.RETIRING.value:
                return False
            record.update(state=HostState.SERVING.value, unretired_at=now)
            record.pop("retiring_at", None)
            record.pop("retiring_by", None)
            return True


class InMemoryClaimIndex:
    def __init__(self, jobs: InMemoryJobStore) -> None:
        self._jobs = jobs

    def open_claims(self, host_id: str) -> list[JobRecord]:
        return [job for job in self._jobs.all()
                if job.host_id == host_id and job.state in CLAIM_STATES]


# --- webhook deliveries ---------------------------------------------------------------------------


class InMemoryDeliveryLog:
    def __init__(self, lease_s: int = 30) -> None:
        self._lock = threading.Lock()
        self._lease_s = lease_s
        self.records: dict[str, dict[str, Any]] = {}

    def begin(self, delivery_id: str, event: str, now: float) -> bool:
        with self._lock:
            record = self.records.get(delivery_id)
            if record and not (
                record["status"] == FAILED
                or (record["status"] == PROCESSING and record["lease_until"] < now)
            ):
                return False
            self.records[delivery_id] = {
                "event": event, "status": PROCESSING, "lease_until": now + self._lease_s,
            }
            return True

    def finish(self, delivery_id: str, now: float, outcome: str, job_id: int | None) -> None:
        with self._lock:
            self.records[delivery_id].update(status=DONE, outcome=outcome, job_id=job_id)

    def fail(self, delivery_id: str, now: float, reason: str) -> None:
        with self._lock:
            record = self.records.get(delivery_id)
            if record and record["status"] == PROCESSING:
                record.update(status=FAILED, failure=reason)


# --- demand queues --------------------------------------------------------------------------------


class InMemoryDemandQueue:
    """FIFO de-duplication by id, as SQS does within its 5-minute window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self.messages: list[DemandMessage] = []
        # pool -> what its DLQ holds: (receipt, DemandMessage or None for a malformed body)
        self.dead: dict[str, list[tuple[str, DemandMessage | None]]] = {}

    def dead_letter(self, pool: str, message: DemandMessage | None) -> None:
        """Put a message on the pool's DLQ (as SQS does after too many receives)."""
        with self._lock:
            line = self.dead.setdefault(pool, [])
            line.append((f"{pool}:{len(line)}:{id(message)}", message))

    def dead_letters(self, pool: str, limit: int) -> list[DeadLetter]:
        with self._lock:
            return [DeadLetter(pool, receipt, message)
                    for receipt, message in self.dead.get(pool, [])[:limit]]

    def forget(self, letter: DeadLetter) -> None:
        with self._lock:
            self.dead[letter.pool] = [
                item for item in self.dead.get(letter.pool, []) if item[0] != letter.receipt
            ]

    def send(self, message: DemandMessage) -> str:
        with self._lock:
            if message.deduplication_id not in self._seen:
                self._seen.add(message.deduplication_id)
                self.messages.append(message)
            return message.deduplication_id


# --- the reconciler's table and the jobs' by_state index ------------------------------------------


class InMemoryReconcilerTable:
    """Lease, state, delivery statuses and marks in one dict, like the deliveries table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lease: dict[str, Any] = {}
        self.state_json: str | None = None
        self.statuses: dict[str, str] = {}
        self.marks: dict[str, Mark] = {}

    # LeaseStore
    def acquire(self, owner: str, now: float, lease_s: float) -> ReconcilerState | None:
        with self._lock:
            if self.lease and self.lease["lease_until"] >= now and self.lease["owner"] != owner:
                return None
            self.lease = {"owner": owner, "lease_until": now + lease_s}
            return ReconcilerState.from_json(self.state_json)

    def save(self, owner: str, state: ReconcilerState, now: float) -> bool:
        with self._lock:
            if self.lease.get("owner") != owner:
                return False
            self.state_json = state.to_json()
            self.lease["lease_until"] = now
            return True

    @property
    def state(self) -> ReconcilerState:
        return ReconcilerState.from_json(self.state_json)

    # DeliveryRecords
    def lookup(self, guids: Sequence[str]) -> tuple[dict[str, str], dict[str, Mark]]:
        with self._lock:
            return (
                {g: self.statuses[g] for g in guids if g in self.statuses},
                {g: self.marks[g] for g in guids if g in self.marks},
            )

    def claim_redelivery(self, guid: str, now: float, every_s: float) -> Mark | None:
        with self._lock:
            mark = self.marks.get(guid)
            if mark and mark.last_at > now - every_s:
                return None
            self.marks[guid] = Mark(now, (mark.attempts if mark else 0) + 1)
            return self.marks[guid]


class InMemoryJobIndex:
    def __init__(self, store: InMemoryJobStore) -> None:
        self._store = store

    def stale(self, state: JobState, before: float, limit: int) -> list[JobRecord]:
        jobs = [job for job in self._store.all() if job.state is state and job.updated_at < before]
        return sorted(jobs, key=lambda job: job.updated_at)[: max(0, limit)]

    def census(self, states) -> dict[JobState, tuple[int, int]]:
        jobs = self._store.all()
        return {state: (sum(1 for job in jobs if job.state is state),
                        sum(1 for job in jobs
                            if job.state is state and getattr(job, "flagged", None)))
                for state in states}


# --- the scaler's lease and its view of waiting jobs ----------------------------------------------


class InMemoryScalerLease:
    """The same lease as DynamoScalerLease, on a dict: the same two writes (`take`,
    `ask_again`), each atomic, and the same loop between them (`store.acquire_or_ask`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: dict[str, dict[str, Any]] = {}

    def acquire(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        from chalicelib.scaler.store import acquire_or_ask

        return acquire_or_ask(self, pool, owner, now, lease_s)

    def take(self, pool: str, owner: str, now: float, lease_s: float) -> bool:
        with self._lock:
            item = self.items.get(pool)
            held = item and "owner" in item
            if held and item["lease_until"] >= now and item["owner"] != owner:
                return False
            self.items[pool] = {"owner": owner, "lease_until": now + lease_s}
            return True

    def ask_again(self, pool: str, owner: str, now: float) -> bool:
        with self._lock:
            item = self.items.get(pool)
            if not item or "owner" not in item or item["owner"] == owner \
                    or item["lease_until"] < now:
                return False
            item["again"] = True
            return True

    def release(self, pool: str, owner: str, now: float, keep_again: bool = False) -> bool:
        with self._lock:
            item = self.items.get(pool)
            if not item or item.get("owner") != owner:
                return False
            again = bool(item.get("again", False))
            if not keep_again:
                item.pop("again", None)
            del item["owner"]
            item["lease_until"] = now - 1
            return again


class InMemoryWaitingJobs:
    def __init__(self, store: InMemoryJobStore) -> None:
        self._store = store

    def waiting(self, pool: str) -> list[JobRecord]:
        return [job for job in self._store.all()
                if job.pool == pool and job.state in WAITING_FOR_RUNNER]


class InMemoryHeldJobs:
    def __init__(self, store: InMemoryJobStore) -> None:
        self._store = store

    def holding(self, host_id: str) -> list[JobRecord]:
        from chalicelib.scaler.store import HELD_STATES

        return [job for job in self._store.all()
                if job.host_id == host_id and job.state in HELD_STATES]
