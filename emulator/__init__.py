"""GitHub emulator for RunnerHub: REST API, signed `workflow_job` webhooks and job assignment.

    from emulator import Emulator, EmulatorConfig, AppConfig, InstallationConfig
    with Emulator(EmulatorConfig(apps=[...], webhook_url=url, webhook_secret=s)) as emu:
        emu.load_workload("workload.json"); emu.run_workload(); emu.wait_until_done(60)

See docs/emulator.md.
"""

from .config import (
    REAL_RUNNER_STARTUP_S,
    AppConfig,
    EmulatorConfig,
    InstallationConfig,
    RunnerGroupConfig,
)
from .server import Emulator
from .workload import Workload, WorkloadJob

__all__ = [
    "REAL_RUNNER_STARTUP_S",
    "AppConfig",
    "Emulator",
    "EmulatorConfig",
    "InstallationConfig",
    "RunnerGroupConfig",
    "Workload",
    "WorkloadJob",
]
