"""Rotating the webhook secret under a steady stream of signed deliveries refuses none.

The webhook app runs in its own process (devstack.webhook_server) reading its secrets from a
real OpenBao dev server with a 1 s cache; the GitHub emulator sends a delivery every 100 ms; the
rotation command (`python -m chalicelib.rotation rotate`) runs as a process of its own and
switches the emulator's secret through `PATCH /app/hook/config`. No executor: jobs stay queued,
only the webhook's answers matter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from chalicelib import aws
from chalicelib.pools import load_pools
from devstack.resources import create_queues, create_tables
from tests.conftest import ROOT

OLD = "old-webhook-secret-7f3a"
APP_ID = 424_242
CACHE_TTL_S = 1
DELIVERY_EVERY_S = 0.1
# The cache TTL plus a margin; the overlap covers deliveries queued at the (serialised)
# webhook when GitHub switches, which take a few hundred ms on a busy machine.
PROPAGATION_S = CACHE_TTL_S + 1
OVERLAP_S = 3
POOLS = """
[[pool]]
name = "linux"
labels = ["self-hosted", "linux"]
scope = { owner = "octo-org" }
image = "runnerhub/runner-linux-small:local"
"""


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNERHUB_")}
    env.update(values)
    return env


@pytest.fixture
def system(aws_endpoint, vault_server, tmp_path, unique):
    from emulator import AppConfig, Emulator, EmulatorConfig, InstallationConfig
    from emulator.testing import generate_app_key

    prefix = f"rot-{unique}-"
    pools_file = tmp_path / "pools.toml"
    pools_file.write_text(POOLS)
    tables = {name: f"{prefix}{name.removesuffix('_table')}"
              for name in ("jobs_table", "deliveries_table", "runners_table")}
    create_tables(aws.client("dynamodb"), tables)
    create_queues(aws.client("sqs"), load_pools(pools_file), prefix)

    secret_path = f"runnerhub/{unique}/webhook-secret"
    app_path = f"runnerhub/{unique}/github-app"
    private_key, public_key = generate_app_key()
    vault_server.put(secret_path, {"secrets": [OLD]})
    vault_server.put(app_path, {"app_id": APP_ID, "private_key": private_key})

    common = {
        **vault_server.env(),
        "AWS_ENDPOINT_URL": aws_endpoint,
        "RUNNERHUB_WEBHOOK_SECRET_ID": secret_path,
        "RUNNERHUB_SECRET_CACHE_TTL_S": str(CACHE_TTL_S),
    }
    webhook_log = (tmp_path / "webhook.log").open("w")
    webhook = subprocess.Popen(
        [sys.executable, "-m", "devstack.webhook_server", "--port", "0"], cwd=ROOT,
        env=clean_env(**common, RUNNERHUB_POOLS_FILE=str(pools_file),
                      RUNNERHUB_QUEUE_PREFIX=prefix, RUNNERHUB_EMIT_METRICS="false",
                      **{f"RUNNERHUB_{k.upper()}": v for k, v in tables.items()}),
        stdout=subprocess.PIPE, stderr=webhook_log, text=True,
    )
    url = webhook.stdout.readline().strip()
    assert url.startswith("http://"), (tmp_path / "webhook.log").read_text()
    emulator = Emulator(EmulatorConfig(
        apps=[AppConfig(app_id=APP_ID, public_key_pem=public_key,
                        installations=[InstallationConfig(id=10, account="octo-org")])],
        webhook_url=f"{url}/webhook", webhook_secret=OLD,
    )).start()
    rotation_env = clean_env(
        **common,
        RUNNERHUB_GITHUB_APP_SECRET_ID=app_path,
        RUNNERHUB_GITHUB_API_URL=emulator.base_url,
        RUNNERHUB_ROTATION_PROPAGATION_S=str(PROPAGATION_S),
        RUNNERHUB_ROTATION_OVERLAP_S=str(OVERLAP_S),
    )
    try:
        yield {"emulator": emulator, "vault": vault_server, "secret_path": secret_path,
               "rotation_env": rotation_env, "webhook_log": tmp_path / "webhook.log"}
    finally:
        emulator.stop()
        webhook.terminate()
        webhook.wait(timeout=10)
        webhook_log.close()


class Workload(threading.Thread):
    """One new queued job (one signed delivery) every DELIVERY_EVERY_S until stopped."""

    def __init__(self, emulator) -> None:
        super().__init__(daemon=True)
        self.emulator = emulator
        self.stopped = threading.Event()
        self.signed_with: list[str] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            self.signed_with.append(self.emulator.sender.secret)
            self.emulator.add_job(repository="octo-org/app", labels=["self-hosted", "linux"])
            self.stopped.wait(DELIVERY_EVERY_S)


def deliver_one(emulator) -> int:
    emulator.add_job(repository="octo-org/app", labels=["self-hosted", "linux"])
    assert emulator.sender.flush(10)
    return emulator.deliveries()[-1]["status_code"]


def test_rotation_during_a_workload_refuses_no_delivery(system):
    emulator, vault = system["emulator"], system["vault"]
    workload = Workload(emulator)
    workload.start()
    time.sleep(0.5)  # deliveries signed with the old secret before the rotation starts
    started = time.monotonic()
    rotation = subprocess.run(
        [sys.executable, "-m", "chalicelib.rotation", "rotate"], cwd=ROOT,
        env=system["rotation_env"], capture_output=True, text=True, timeout=60,
    )
    took = time.monotonic() - started
    time.sleep(0.5)  # and some after it finished
    workload.stopped.set()
    workload.join()
    assert emulator.sender.flush(15)
    assert rotation.returncode == 0, rotation.stderr

    new = vault.get(system["secret_path"])["secrets"]
    assert len(new) == 1 and new[0] != OLD
    [new] = new
    assert emulator.sender.secret == new  # GitHub's side was switched by the command
    assert took >= PROPAGATION_S + OVERLAP_S  # both waits were made, not skipped

    deliveries = emulator.deliveries()
    statuses = [d["status_code"] for d in deliveries]
    assert len(deliveries) == len(workload.signed_with) > 30
    assert workload.signed_with.count(OLD) > 10 and workload.signed_with.count(new) > 10
    assert all(200 <= status < 300 for status in statuses), sorted(set(statuses))

    # after retirement (and one cache TTL) the old secret is refused, the new one accepted
    time.sleep(CACHE_TTL_S + 0.2)
    emulator.set_webhook(secret=OLD)
    assert deliver_one(emulator) == 401
    emulator.set_webhook(secret=new)
    assert deliver_one(emulator) == 200

    # every step was logged, and no secret value anywhere in the command's or webhook's output
    output = rotation.stdout + rotation.stderr
    for step in ("step 1/3", "step 2/3", "step 3/3"):
        assert step in output
    webhook_output = system["webhook_log"].read_text()
    for secret in (OLD, new):
        assert secret not in output and secret not in webhook_output
