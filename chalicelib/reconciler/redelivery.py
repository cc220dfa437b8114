"""Lost webhooks, acted on: read every App's delivery log from where the last run stopped and
redeliver what `reconciler.deliveries` says to (a mixin of `Reconciler`)."""

from __future__ import annotations

from chalicelib.github import GitHubApp, GitHubError
from chalicelib.reconciler.common import EXPECTED_ERRORS, Tally, logger
from chalicelib.reconciler.deliveries import (
    Attempt,
    DeliveryCursor,
    advance_cursor,
    candidate_guids,
    plan_deliveries,
    read_page,
)
from chalicelib.reconciler.state import ReconcilerState


class LostWebhooks:
    """Needs the Reconciler's `_apps`, `_clock`, `_deliveries`, `_policy` and `_time_left`."""

    def _lost_webhooks(self, state: ReconcilerState, tally: Tally) -> ReconcilerState:
        """Every App's delivery log: each App has its own webhook, so a delivery to the second
        App is only in the second App's log."""
        tally.set("deliveries_read", 0)
        tally.set("pending_deliveries", 0)
        for index, app in enumerate(self._apps):
            app_id = app.app_id
            cursor = state.cursor_of(app_id, first=index == 0)
            try:
                cursor = self._app_lost_webhooks(app, cursor, tally)
            except EXPECTED_ERRORS as exc:
                tally.add("errors", dimension=("step", "deliveries"))
                logger.warning("lost webhooks of App %s not checked: %s", app_id, exc)
                continue
            state = state.with_cursor(app_id, cursor)
        return state

    def _app_lost_webhooks(self, app: GitHubApp, cursor: DeliveryCursor, tally: Tally
                           ) -> DeliveryCursor:
        now = self._clock()
        attempts, top, finished, next_cursor = self._read_deliveries(app, cursor, now, tally)
        tally.add("deliveries_read", len(attempts))
        guids = candidate_guids(attempts, cursor.pending)
        statuses, marks = self._deliveries.lookup(guids) if guids else ({}, {})
        plan = plan_deliveries(attempts, cursor.pending, statuses, marks, now, self._policy)
        gone: set[str] = set()
        for item in plan.redeliver:
            if not self._time_left():
                break
            logger.append_keys(delivery_id=item.guid)
            try:
                every_s = self._policy.redeliver_every_s
                if self._deliveries.claim_redelivery(item.guid, now, every_s) is None:
                    continue  # redelivered moments ago by another run
                if app.redeliver(item.delivery_id):
                    tally.add("redelivered")
                    logger.info("failed delivery redelivered", extra={"attempt": item.attempt})
                else:
                    gone.add(item.guid)
                    tally.add("abandoned")
                    logger.warning("delivery no longer on GitHub; given up")
            except EXPECTED_ERRORS as exc:
                tally.add("errors", dimension=("step", "redeliver"))
                logger.warning("redelivery failed: %s", exc)
            finally:
                logger.remove_keys(["delivery_id"])
        for abandoned in plan.abandoned:
            tally.add("abandoned")
            logger.warning("delivery given up: %s", abandoned.reason,
                           extra={"delivery_id": abandoned.pending.guid})
        pending = [p for p in plan.pending if p.guid not in gone]
        tally.add("pending_deliveries", len(pending))
        return advance_cursor(cursor, top, finished, next_cursor, pending)

    def _read_deliveries(
        self, app: GitHubApp, cursor: DeliveryCursor, now: float, tally: Tally
    ) -> tuple[list[Attempt], int, bool, str | None]:
        """Pages of GitHub's log, newest first, down to what earlier runs saw, within the page
        budget. Returns (new attempts, the scan's newest id, finished, where to resume)."""
        oldest = now - self._policy.delivery_lookback_s
        page_cursor = cursor.resume
        top = cursor.resume_top if cursor.resume else 0
        found: list[Attempt] = []
        for _ in range(self._policy.delivery_pages_per_run):
            try:
                page = app.list_deliveries(page_cursor)
            except GitHubError as exc:
                # Resume from this page next run; what was read so far is still planned.
                tally.add("errors", dimension=("step", "list_deliveries"))
                logger.warning("listing deliveries failed: %s", exc)
                return found, top, False, page_cursor or cursor.resume
            attempts = []
            for item in page.deliveries:
                try:
                    attempts.append(Attempt.from_github(item))
                except (ValueError, KeyError, TypeError):
                    logger.warning("malformed delivery in GitHub's log skipped")
            if attempts and not top:
                top = max(a.id for a in attempts)
            verdict = read_page(attempts, cursor.floor_id, oldest)
            found += verdict.fresh
            if verdict.reached_end or page.next_cursor is None:
                return found, top, True, None
            page_cursor = page.next_cursor
        return found, top, False, page_cursor
