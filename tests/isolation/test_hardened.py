"""The hardened profile, against the real Docker engine and real iptables (issue 18).

Runner containers are started the executor's way (RunnerContainers.start: a network of their
own, firewall rules, no capabilities, read-only root) from a probe image whose "runner" reads
its JIT config (a JSON script) like a real one and then tries what a hostile job would. Every
"cannot" has a positive control: a plain container on a plain network the test made reaches
the same stand-ins.

Stand-ins, all made and removed here: a metadata service on 169.254.169.254 in a network
namespace of its own, reached through a policy route that only the test's source ranges use
(this machine's own processes keep their route to the address); a listener on the host end
of that namespace's veth pair (a host address); a listener in another job's container.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import tarfile
import threading
import time

import pytest
from pydantic import SecretStr

from chalicelib.api.audit import MemoryAuditLog
from chalicelib.pools import Pool
from executor.containers import DOCKER_SOCKET, RunnerContainers, RunnerSpec, job_network_name
from executor.firewall import Firewall
from executor.metrics import ExecutorMetrics
from executor.monitor import FirewallCounters, Monitor
from tests.conftest import require, wait_for

pytestmark = [pytest.mark.isolation, pytest.mark.docker]

PROBE_IMAGE = "runnerhub/isolation-probe:local"
RUNNER_IMAGE = "runnerhub/runner-base:local"
TAG = f"{os.getpid() % 100000}"
# Test-chosen ranges (nothing else on this machine uses 10.213.0.0/16).
JOB_SUBNETS = "10.213.16.0/20"
PLAIN_SUBNET = "10.213.1.0/28"
SOURCES = "10.213.0.0/17"  # the ranges routed to the stand-in metadata service
VETH_HOST, VETH_NS = "10.213.255.1", "10.213.255.2"
HOST_ADDRESS = VETH_HOST  # a host address the test made
IMDS = "169.254.169.254"
ROUTE_TABLE = "2130"

# The probe image's runner: reads its JIT config the way a runner does (once, at start), then
# runs the script it carries. `probe` tries each target in parallel: "ok" (answered),
# "refused" (reached: nothing listens), "timeout"/"unreachable" (dropped on the way).
PROBE = r'''
import json, os, socket, subprocess, sys, threading, time
path = "/run/runnerhub/jitconfig"
with open(path) as f:
    config = json.loads(f.read())
def probe(targets):
    found = {}
    def one(name, host, port):
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                found[name] = "ok" if s.recv(64) else "closed"
        except ConnectionRefusedError:
            found[name] = "refused"
        except OSError as exc:
            found[name] = "timeout" if isinstance(exc, TimeoutError) else f"unreachable {exc}"
    threads = [threading.Thread(target=one, args=t) for t in targets]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    return found
report = {"read_jitconfig": True}
for _ in range(0 if os.environ.get("PROBE_PLAIN") else 100):  # deleted once read: 5 s
    if not os.path.exists(path):
        break
    time.sleep(0.05)
report["jitconfig_after_start"] = os.path.exists(path)
report["docker_socket"] = any(os.path.exists(p) for p in ("/var/run/docker.sock",
                                                        "/run/docker.sock"))
report["cap_eff"] = [l.split()[1] for l in open("/proc/self/status")
                     if l.startswith("CapEff")][0]
try:
    open("/etc/written", "w").close()
    report["root_writable"] = True
except OSError:
    report["root_writable"] = False
exec(config["script"])
'''

PROBE_DOCKERFILE = f"""FROM {RUNNER_IMAGE}
COPY probe.py /opt/probe.py
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "python3", "/opt/probe.py"]
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


@pytest.fixture(scope="module")
def probe_image(docker_client):
    """FROM the local runner image (nothing pulled); Docker's cache makes a rebuild instant."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, text in (("Dockerfile", PROBE_DOCKERFILE), ("probe.py", PROBE)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    docker_client.images.build(fileobj=context, custom_context=True, tag=PROBE_IMAGE,
                               labels={"runnerhub.test": "isolation"}, pull=False, rm=True)
    return PROBE_IMAGE


@pytest.fixture(scope="module")
def tools(docker_client):
    for tool in ("ip", "iptables"):
        require(sh("which", tool, check=False).returncode == 0, f"the {tool} command")
    require(sh("iptables", "-w", "5", "-n", "-L", "DOCKER-USER", check=False).returncode == 0,
            "Docker's DOCKER-USER chain (dockerd with iptables on)")


STANDIN_SERVER = r'''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"i-standin\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
'''


@pytest.fixture(scope="module")
def metadata_standin(tools):
    """169.254.169.254 (and VETH_NS) answering HTTP in a namespace of the test's own, routed
    to only from SOURCES: like IMDS on EC2, a job reaches it through the host's FORWARD."""
    ns, host_if, ns_if = f"rhmd{TAG}", f"rhmdh{TAG}", f"rhmdn{TAG}"
    server = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{VETH_HOST}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        inside = ("ip", "netns", "exec", ns)
        sh(*inside, "ip", "addr", "add", f"{VETH_NS}/30", "dev", ns_if)
        sh(*inside, "ip", "addr", "add", f"{IMDS}/32", "dev", "lo")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "link", "set", ns_if, "up")
        sh(*inside, "ip", "route", "add", "default", "via", VETH_HOST)
        sh("ip", "route", "add", f"{IMDS}/32", "via", VETH_NS, "dev", host_if, "table",
           ROUTE_TABLE)
        sh("ip", "rule", "add", "from", SOURCES, "to", f"{IMDS}/32", "lookup", ROUTE_TABLE,
           "priority", ROUTE_TABLE)
        server = subprocess.Popen([*inside, "python3", "-c", STANDIN_SERVER])

        def answers() -> bool:
            probe = sh(*inside, "python3", "-c",
                       "import urllib.request;urllib.request.urlopen("
                       f"'http://{IMDS}/', timeout=1)", check=False)
            return probe.returncode == 0
        assert wait_for(answers, timeout=10, interval=0.2), "the metadata stand-in is down"
        yield
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        sh("ip", "rule", "del", "priority", ROUTE_TABLE, check=False)
        sh("ip", "route", "flush", "table", ROUTE_TABLE, check=False)
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def host_listener(metadata_standin):
    """A TCP listener on a host address (the host end of the test's veth pair: this kernel
    has no dummy interfaces), answering every connection."""
    listener = socket.socket()
    stop = threading.Event()
    accepted = []
    try:
        listener.bind((HOST_ADDRESS, 0))
        listener.listen(16)
        listener.settimeout(0.2)

        def serve() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    conn, peer = listener.accept()
                    accepted.append(peer[0])
                    with conn:
                        conn.sendall(b"host\n")
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield listener.getsockname()[1], accepted
        stop.set()
        thread.join(timeout=5)
    finally:
        listener.close()


@pytest.fixture
def containers(docker_client, tmp_path, tools):
    had_chain = sh("iptables", "-w", "5", "-t", "mangle", "-n", "-L", "RUNNERHUB",
                   check=False).returncode == 0
    made = RunnerContainers(docker_client, tmp_path / "jit", "runnerhub-test",
                            job_subnets=JOB_SUBNETS)
    made.prepare(f"isolation-{TAG}")
    names: list[str] = []
    made.started = names
    yield made
    for name in names:
        made.remove(name)
    made.jit_watch.close()
    left = [n.name for n in docker_client.networks.list() if n.name.startswith("rh-job-rhiso")]
    assert left == []
    firewall = Firewall()
    assert not {job_network_name(name) for name in names} & firewall.networks()
    if not had_chain and not firewall.rules():  # leave the machine as it was
        for parent in ("FORWARD", "INPUT"):
            sh("iptables", "-w", "5", "-t", "mangle", "-D", parent, "-j", "RUNNERHUB",
               check=False)
        sh("iptables", "-w", "5", "-t", "mangle", "-X", "RUNNERHUB", check=False)


def start(containers: RunnerContainers, name: str, script: str, *, memory_mb: int = 256,
          pids_limit: int = 128, egress_allow: tuple[str, ...] = ()) -> str:
    spec = RunnerSpec(name=name, image=PROBE_IMAGE, pool="iso", job_id=1, generation=1,
                      host_id=f"isolation-{TAG}", cpus=0.5, memory_mb=memory_mb,
                      pids_limit=pids_limit, egress_allow=egress_allow)
    containers.started.append(name)
    return containers.start(spec, SecretStr(json.dumps({"script": script})))


def report_of(docker_client, name: str, timeout: float = 40) -> dict:
    container = docker_client.containers.get(name)
    container.wait(timeout=timeout)
    logs = container.logs().decode()
    lines = [line for line in logs.splitlines() if line.startswith("{")]
    assert lines, logs[-2000:]
    return json.loads(lines[-1])


def ip_of(docker_client, name: str) -> str:
    container = docker_client.containers.get(name)
    (network,) = container.attrs["NetworkSettings"]["Networks"].values()
    return network["IPAddress"]


def test_hardened_job_has_no_capability_no_docker_socket_a_read_only_root_no_jit_config(
        docker_client, probe_image, containers):
    """The container's own boundaries (the network's are checked below)."""
    name = f"rhiso-self-{TAG}"
    start(containers, name, "print(json.dumps(report))")
    found = report_of(docker_client, name)
    assert found["docker_socket"] is False
    assert found["cap_eff"] == "0000000000000000" and found["root_writable"] is False
    assert found["read_jitconfig"] is True and found["jitconfig_after_start"] is False
    assert not containers.jitconfig_path(name).exists()
    attrs = docker_client.containers.get(name).attrs
    assert not any(DOCKER_SOCKET in (m.get("Source") or "") for m in attrs["Mounts"])
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"] and not attrs["HostConfig"]["CapAdd"]
    assert "no-new-privileges:true" in attrs["HostConfig"]["SecurityOpt"]


@pytest.mark.leak_soak
def test_hardened_job_cannot_reach_what_is_not_its_own(docker_client, probe_image, containers,
                                                       metadata_standin, host_listener):
    port, accepted = host_listener
    target = f"rhiso-target-{TAG}"
    start(containers, target, "import http.server, functools\n"
          "h = functools.partial(http.server.SimpleHTTPRequestHandler, directory='/tmp')\n"
          "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), h).serve_forever()")
    target_ip = ip_of(docker_client, target)
    # Positive control: the target listens (the host may reach its jobs; replies pass).
    assert wait_for(lambda: _connects(target_ip, 8080), timeout=10, interval=0.2)

    targets = [("imds", IMDS, 80), ("host", HOST_ADDRESS, port), ("other_job", target_ip, 8080),
               ("internet", VETH_NS, 80), ("closed_port", VETH_NS, 81)]
    script = f"print(json.dumps(report | probe({targets!r})))"
    attacker = f"rhiso-attacker-{TAG}"
    allowlisted = f"rhiso-allowlisted-{TAG}"
    # The runtime monitor of this host, as the daemon runs it: its first read of the firewall's
    # counters comes before the attacker's rules exist (they then count from zero).
    audit = MemoryAuditLog()
    monitor = Monitor(client=docker_client, host_id=f"isolation-{TAG}",
                      pools={"iso": Pool(name="iso", labels=("self-hosted",),
                                         scope={"owner": "acme"}, image=PROBE_IMAGE)},
                      audit=audit, metrics=ExecutorMetrics(),
                      stop_container=lambda name: None, firewall=FirewallCounters(),
                      interval_s=0.2)
    monitor.tick(time.time())
    # Ticked as the daemon does while the jobs run (they exit once they have tried).
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.2):
            monitor.tick(time.time())

    ticker = threading.Thread(target=watch, daemon=True)
    ticker.start()
    start(containers, attacker, script)
    start(containers, allowlisted, script,
          egress_allow=(f"{VETH_NS}/32:80", "169.254.0.0/16"))  # an allow never opens IMDS
    plain = _plain_probe(docker_client, script)

    # The positive control: a plain container on a plain network reaches every stand-in.
    assert plain["imds"] == "ok" and plain["host"] == "ok" and plain["internet"] == "ok"
    assert plain["closed_port"] == "refused"
    assert plain["cap_eff"] != "0000000000000000" and plain["root_writable"] is True

    hardened = report_of(docker_client, attacker)
    assert hardened["imds"] == "timeout"
    assert hardened["host"] == "timeout"
    assert hardened["other_job"] == "timeout"  # the `jobs` rule (and Docker's isolation)
    assert hardened["internet"] == "ok" and hardened["closed_port"] == "refused"  # egress open
    assert hardened["docker_socket"] is False
    assert hardened["cap_eff"] == "0000000000000000" and hardened["root_writable"] is False
    assert hardened["read_jitconfig"] is True and hardened["jitconfig_after_start"] is False
    assert not containers.jitconfig_path(attacker).exists()

    listed = report_of(docker_client, allowlisted)
    assert listed["internet"] == "ok"  # allowed: VETH_NS port 80
    assert listed["closed_port"] == "timeout"  # not on the allow-list: dropped
    assert listed["imds"] == "timeout" and listed["host"] == "timeout"

    # The host listener saw only the plain container (masqueraded from the docker host).
    assert len(accepted) == 1
    counters = Firewall().counters()
    network = job_network_name(attacker)
    assert counters[(network, "imds")] >= 1 and counters[(network, "host")] >= 1
    assert counters[(network, "jobs")] >= 1  # the other job's listener
    assert counters[(job_network_name(allowlisted), "egress")] >= 1
    attrs = docker_client.containers.get(attacker).attrs
    assert not any(DOCKER_SOCKET in (m.get("Source") or "") for m in attrs["Mounts"])
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"] and not attrs["HostConfig"]["CapAdd"]
    assert "no-new-privileges:true" in attrs["HostConfig"]["SecurityOpt"]

    # Each blocked attempt shows in the monitor's record (the audit log), with its network and
    # kind (the other job's listener too); the allow-listed job's dropped port too.
    def reasons() -> set[tuple[str, str]]:
        return {(r.target, r.reason) for r in audit.items.values()
                if r.action == "violation:blocked_address"}

    network = job_network_name(attacker)
    wanted = {(f"container:{attacker}", f"blocked: imds ({network})"),
              (f"container:{attacker}", f"blocked: host ({network})"),
              (f"container:{attacker}", f"blocked: jobs ({network})"),
              (f"container:{allowlisted}",
               f"blocked: egress ({job_network_name(allowlisted)})")}
    try:
        assert wait_for(lambda: wanted <= reasons(), timeout=10, interval=0.3), reasons()
    finally:
        watching.set()
        ticker.join(timeout=5)
        monitor.close()


def test_fork_bomb_stops_at_the_pids_limit_and_a_memory_bomb_kills_only_its_job(
        docker_client, probe_image, containers):
    bystander = f"rhiso-bystander-{TAG}"
    start(containers, bystander, "import time\ntime.sleep(120)")
    fork_bomb = ("import os, signal\nkids = []\nerror = None\n"
                 "for _ in range(200):\n"
                 "    try:\n        pid = os.fork()\n    except OSError as exc:\n"
                 "        error = exc.errno\n        break\n"
                 "    if pid == 0:\n        signal.pause()\n        os._exit(0)\n"
                 "    kids.append(pid)\n"
                 "print(json.dumps(report | {'forked': len(kids), 'errno': error}))\n"
                 "[os.kill(k, signal.SIGKILL) for k in kids]\n[os.waitpid(k, 0) for k in kids]")
    forks = f"rhiso-forks-{TAG}"
    start(containers, forks, fork_bomb, pids_limit=32)
    memory = f"rhiso-memory-{TAG}"
    start(containers, memory, "chunks = []\nfor _ in range(64):\n"
          "    chunks.append(b'x' * (8 * 1024 * 1024))\nprint('survived')", memory_mb=64)

    bomb = report_of(docker_client, forks)
    assert bomb["errno"] == 11 and 0 < bomb["forked"] < 32  # EAGAIN at the limit
    # Positive control: without a pids limit the same bomb forks all 200.
    free = docker_client.containers.run(
        PROBE_IMAGE, entrypoint=["python3", "-c", "import json\nreport = {}\n" + fork_bomb],
        network_mode="none", remove=True, stdout=True).decode()
    assert json.loads(free.strip().splitlines()[-1])["forked"] == 200

    killed = docker_client.containers.get(memory)
    assert killed.wait(timeout=40)["StatusCode"] == 137
    killed.reload()
    assert killed.attrs["State"]["OOMKilled"] is True
    assert "survived" not in killed.logs().decode()
    other = docker_client.containers.get(bystander)
    other.reload()
    assert other.status == "running"


def test_a_restarted_daemon_restores_kept_rules_and_removes_what_is_stray(
        docker_client, probe_image, containers):
    kept, stray = f"rhiso-kept-{TAG}", f"rhiso-stray-{TAG}"
    start(containers, kept, "import time\ntime.sleep(60)")
    start(containers, stray, "import time\ntime.sleep(60)")
    firewall = Firewall()
    # The previous daemon removed the stray's container, then died; a reboot-like flush
    # took the kept runner's rules.
    docker_client.containers.get(stray).remove(force=True)
    assert firewall.remove(job_network_name(kept)) == 5
    assert containers.remove_stray_files(keep={kept}) == [stray]
    assert [kind for net, kind, _ in firewall.rules() if net == job_network_name(kept)] == [
        "imds", "host", "self", "jobs", "jobs"]
    assert job_network_name(stray) not in firewall.networks()
    assert [n.name for n in docker_client.networks.list()
            if n.name == job_network_name(stray)] == []
    assert not containers.jitconfig_dir(stray).exists()


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _plain_probe(docker_client, script: str) -> dict:
    """The probe in a plain container (Docker's defaults) on a plain network: the control."""
    network = docker_client.networks.create(
        f"rhiso-plain-{TAG}", driver="bridge",
        ipam={"Driver": "default", "Config": [{"Subnet": PLAIN_SUBNET}]})
    try:
        jit = json.dumps({"script": script})
        entry = ("import os, tempfile\nos.makedirs('/run/runnerhub', exist_ok=True)\n"
                 f"open('/run/runnerhub/jitconfig', 'w').write({jit!r})\n"
                 "exec(open('/opt/probe.py').read())")
        started = time.monotonic()
        out = docker_client.containers.run(
            PROBE_IMAGE, entrypoint=["python3", "-c", entry], user="root",
            environment={"PROBE_PLAIN": "1"}, network=network.name, remove=True,
            stdout=True).decode()
        assert time.monotonic() - started < 30
        return json.loads(out.strip().splitlines()[-1])
    finally:
        network.remove()


def test_rules_round_trip_through_the_real_iptables_in_a_namespace_of_the_tests_own(tools):
    """What the real iptables prints (-S, -L -v) is what Firewall parses and deletes by."""
    ns = f"rhfw{TAG}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "iptables", "-N", "DOCKER-USER")

        def in_ns(argv):
            return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                                  text=True, timeout=30, check=False)
        firewall = Firewall(run=in_ns)
        firewall.apply("rh-job-a", "br-0123456789ab", ("10.0.0.2/32:53", "203.0.113.0/24"))
        firewall.apply("rh-job-b", "br-aaaaaaaaaaaa")
        assert [kind for net, kind, _ in firewall.rules() if net == "rh-job-a"] == [
            "imds", "host", "self", "jobs", "jobs", "allow", "allow", "allow", "egress"]
        listed = in_ns(["iptables", "-t", "mangle", "-S"]).stdout
        assert "-A FORWARD -j RUNNERHUB" in listed and "-A INPUT -j RUNNERHUB" in listed
        firewall.apply("rh-job-a", "br-0123456789ab", ("10.0.0.2/32:53", "203.0.113.0/24"))
        assert len(firewall.rules()) == 14  # applied again: unchanged
        assert set(firewall.counters()) == {("rh-job-a", k) for k in
                                            ("imds", "host", "self", "jobs", "allow",
                                             "egress")} | {
            ("rh-job-b", kind) for kind in ("imds", "host", "self", "jobs")}
        assert firewall.remove("rh-job-a") == 9 and firewall.networks() == {"rh-job-b"}
    finally:
        sh("ip", "netns", "del", ns, check=False)
