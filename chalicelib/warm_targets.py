"""A pool's warm target now: an operator's override when one is set (chalicelib/overrides.py,
through the management API), else the larger of the pools file's (`warm_runners`,
`warm_schedule`: chalicelib.pools.warm_target) and the trainer's forecast (`warm` per 5-minute
bucket: chalicelib.history.forecast_warm); never above `max_runners`, and none from the forecast
or an override where warm runners cannot register (chalicelib.pools.can_warm).

One rule (`wanted`) for every reader: the executor's keeper (executor/warm.py), the scaler's
warm demand (chalicelib/scaler/service.py) and the simulator (forecast/simulate.py), so what
`make replay` judged is what runs. The webhook keeps the file's target alone (no forecast read
on its path): a spare runner it leaves unwarmed is taken up by its executor's next tick.
"""

from __future__ import annotations

from typing import Any

from chalicelib.history import FORECAST_STALE_S, ForecastReader, forecast_warm
from chalicelib.pools import Pool, can_warm, warm_ever, warm_target


def wanted(pool: Pool, now: float, forecast: int) -> int:
    """Warm runners `pool` wants at `now` when the forecast asks `forecast` of them. Pure."""
    scheduled = warm_target(pool, now)
    if forecast <= 0 or not can_warm(pool):
        return scheduled
    return min(max(scheduled, forecast), pool.max_runners)


def warm_override(pool: Pool, warm_runners: int | None) -> int | None:
    """An operator's warm target as applied (None: not set): within max_runners, none where
    warm runners cannot register. Pure."""
    if warm_runners is None:
        return None
    return max(0, min(int(warm_runners), pool.max_runners)) if can_warm(pool) else 0


class WarmTargets:
    """`target(pool, now)`: the pool's override read through `overrides` (chalicelib/overrides.py
    OverridesReader; None: no overrides), else `wanted` with its forecast read through
    `forecasts` (None: the pools file alone, as with `RUNNERHUB_WARM_FORECAST=false`)."""

    def __init__(self, forecasts: ForecastReader | None = None,
                 stale_s: float = FORECAST_STALE_S, overrides: Any = None) -> None:
        self._forecasts = forecasts
        self._stale_s = stale_s
        self._overrides = overrides

    @property
    def follows_forecast(self) -> bool:
        return self._forecasts is not None

    def forecast(self, pool: Pool, now: float) -> int:
        if self._forecasts is None:
            return 0
        return forecast_warm(self._forecasts.item(pool.name), now, self._stale_s)

    def override(self, pool: Pool) -> int | None:
        """The operator's warm target for `pool` as applied, or None."""
        if self._overrides is None:
            return None
        return warm_override(pool, getattr(self._overrides.get(pool.name), "warm_runners", None))

    def overrides(self, pool: Pool) -> Any:
        """The pool's operator overrides as last read (chalicelib/overrides.py PoolOverrides;
        None: no reader, or none read yet): the executor's runner image comes from them too."""
        return None if self._overrides is None else self._overrides.get(pool.name)

    def target(self, pool: Pool, now: float) -> int:
        override = self.override(pool)
        if override is not None:
            return override
        return wanted(pool, now, self.forecast(pool, now))

    def ever(self, pool: Pool) -> int:
        """The most warm runners `pool` may want: its `max_runners` when a forecast or an
        operator may set it (whatever comes next), else the file's most."""
        if (self._forecasts is not None or self._overrides is not None) and can_warm(pool):
            return pool.max_runners
        return warm_ever(pool)
