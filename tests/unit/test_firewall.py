"""The hardened profile's pure parts: firewall rules, their listing and counters, container
options. The real iptables and containers: tests/isolation/test_hardened.py."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from executor.containers import (
    ContainerStartFailed,
    RunnerSpec,
    assert_no_docker_socket,
    hardened_options,
    tmpfs_mounts,
)
from executor.firewall import Firewall, FirewallError, job_rules, parse_counters, parse_rules

NET, BRIDGE = "rh-job-rh-1-1-abc", "br-0123456789ab"


def test_job_rules_drop_link_local_and_host_first_and_egress_only_with_an_allow_list():
    plain = job_rules(NET, BRIDGE)
    assert [r.kind for r in plain] == ["imds", "host", "self", "jobs", "jobs"]
    assert all(r.spec[:2] == ("-i", BRIDGE) for r in plain)
    assert [r.spec[-1] for r in plain] == ["DROP", "DROP", "RETURN", "DROP", "DROP"]
    # Another job's network (any other Docker bridge) is dropped by a rule of our own.
    assert {r.spec[3] for r in plain if r.kind == "jobs"} == {"br-+", "docker0"}
    assert "169.254.0.0/16" in plain[0].spec
    listed = job_rules(NET, BRIDGE, ("10.0.0.2/32:53", "203.0.113.0/24"))
    # tcp and udp for a port; RETURN (Docker's isolation still applies); the DROP comes last.
    assert [r.kind for r in listed] == ["imds", "host", "self", "jobs", "jobs", "allow", "allow",
                                        "allow", "egress"]
    assert [r.spec[-1] for r in listed[5:8]] == ["RETURN"] * 3
    assert {r.spec[5] for r in listed[5:7]} == {"tcp", "udp"}
    assert listed[-1].argv()[-4:] == ["--comment", f"runnerhub:{NET}:egress", "-j", "DROP"]


@pytest.mark.parametrize("bridge", ["", "br-0123456789abcdef", "br x", "br;rm"])
def test_job_rules_reject_a_bad_bridge_name(bridge):
    with pytest.raises(ValueError, match="bridge"):
        job_rules(NET, bridge)


def test_job_rules_reject_a_bad_allow_entry():
    with pytest.raises(ValueError, match="egress_allow"):
        job_rules(NET, BRIDGE, ("10.0.0.0/8:99999",))


LISTING = f"""Chain RUNNERHUB (2 references)
    pkts      bytes target     prot opt in     out     source               destination
       3      180 DROP       all  --  {BRIDGE} *       0.0.0.0/0            169.254.0.0/16       /* runnerhub:{NET}:imds */
       0        0 DROP       all  --  {BRIDGE} *       0.0.0.0/0            0.0.0.0/0            ADDRTYPE match dst-type LOCAL ctstate !RELATED,ESTABLISHED /* runnerhub:{NET}:host */
       2      120 RETURN     tcp  --  {BRIDGE} *       0.0.0.0/0            10.0.0.2             tcp dpt:53 /* runnerhub:{NET}:allow */
       1       60 RETURN     udp  --  {BRIDGE} *       0.0.0.0/0            10.0.0.2             udp dpt:53 /* runnerhub:{NET}:allow */
       9      999 DROP       all  --  *      *       0.0.0.0/0            0.0.0.0/0            /* someone else's */
"""  # noqa: E501


def test_counters_sum_per_network_and_kind_and_skip_other_rules():
    assert parse_counters(LISTING) == {(NET, "imds"): 3, (NET, "host"): 0, (NET, "allow"): 3}
    assert parse_counters("") == {}


class FakeIptables:
    """Just enough of `iptables -S/-A/-D/-N/-C/-I/-L` over a list of rules."""

    def __init__(self, fail_on: str = "", filter_chains: tuple[str, ...] = ("DOCKER-USER",),
                 ) -> None:
        self.rules: list[list[str]] = []  # the mangle table's RUNNERHUB
        self.chains: set[str] = {"FORWARD", "INPUT"}
        self.jumps: list[tuple[str, int]] = []
        self.filter = set(filter_chains)
        self.filter_jumps = ["DOCKER-USER", "FORWARD", "INPUT"] if "RUNNERHUB" in self.filter \
            else []
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess:
        assert argv[:3] == ["iptables", "-w", "10"] and argv[3] == "-t"
        self.calls.append(argv)
        table, op, args = argv[4], argv[5], argv[6:]
        ok = subprocess.CompletedProcess(argv, 0, "", "")
        bad = subprocess.CompletedProcess(argv, 1, "", "iptables: Bad rule.")
        if table == "filter":  # Docker's chains and an earlier version's RUNNERHUB
            if op == "-n":
                return ok if args[1] in self.filter else bad
            if op == "-D":
                if args[0] in self.filter_jumps:
                    self.filter_jumps.remove(args[0])
                    return ok
                return bad
            if op == "-X":
                self.filter.discard(args[0])
            return ok
        assert table == "mangle"
        if self.fail_on and self.fail_on in argv:
            return bad
        if op == "-N":
            self.chains.add(args[0])
        elif op == "-n" and args[0] == "-L":
            return ok if args[1] in self.chains else bad
        elif op == "-C":
            return ok if (args[0], 1) in self.jumps else bad
        elif op == "-I":
            self.jumps.append((args[0], 1))
        elif op == "-A":
            self.rules.append(args[1:])
        elif op == "-D":
            self.rules.remove(args[1:])
        elif op == "-S":
            lines = [f"-N {args[0]}"] + [shlex.join(["-A", args[0], *r]) for r in self.rules]
            return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")
        return ok


def test_apply_is_idempotent_and_remove_deletes_only_that_networks_rules():
    fake = FakeIptables()
    firewall = Firewall(run=fake)
    firewall.apply(NET, BRIDGE, ("10.0.0.2/32:53",))
    firewall.apply("rh-job-other", "br-aaaaaaaaaaaa")
    assert fake.jumps == [("FORWARD", 1), ("INPUT", 1)]
    assert len(fake.rules) == 8 + 5 and firewall.networks() == {NET, "rh-job-other"}
    writes = sum(call[3] in ("-A", "-D") for call in fake.calls)
    firewall.apply(NET, BRIDGE, ("10.0.0.2/32:53",))  # a restarted daemon adopting it
    assert sum(call[3] in ("-A", "-D") for call in fake.calls) == writes
    firewall.apply(NET, BRIDGE)  # the pool's allow-list changed: replaced
    assert [kind for net, kind, _ in parse_rules(
        fake(["iptables", "-w", "10", "-t", "mangle", "-S", "RUNNERHUB"]).stdout)
        if net == NET] == [
        "imds", "host", "self", "jobs", "jobs"]
    assert firewall.remove(NET) == 5
    assert firewall.networks() == {"rh-job-other"}
    assert firewall.remove(NET) == 0


def test_a_failed_rule_leaves_no_half_rule_set_and_says_why():
    fake = FakeIptables(fail_on="RETURN")
    with pytest.raises(FirewallError, match="Bad rule"):
        Firewall(run=fake).apply(NET, BRIDGE, ("10.0.0.0/8",))
    assert fake.rules == []


def test_without_dockers_filter_chains_no_rule_is_set_and_says_why():
    fake = FakeIptables(filter_chains=())
    with pytest.raises(FirewallError, match="DOCKER-USER chain is missing"):
        Firewall(run=fake).apply(NET, BRIDGE)
    assert fake.rules == [] and fake.jumps == []


def test_an_earlier_versions_filter_chain_and_its_three_jumps_are_removed():
    fake = FakeIptables(filter_chains=("DOCKER-USER", "RUNNERHUB"))
    Firewall(run=fake).ensure_chain()
    assert fake.filter_jumps == [] and fake.filter == {"DOCKER-USER"}
    assert fake.jumps == [("FORWARD", 1), ("INPUT", 1)]


def test_a_missing_iptables_binary_is_a_firewall_error():
    with pytest.raises(FirewallError, match="no-such-iptables"):
        Firewall(binary="no-such-iptables").ensure_chain()


SPEC = RunnerSpec(name="rh-1-1-abc", image="i", pool="p", job_id=1, generation=1,
                  host_id="h", cpus=1.5, memory_mb=1024, pids_limit=100, disk_mb=300)


def test_hardened_options_drop_every_capability_and_size_tmpfs_by_memory_and_disk():
    options = hardened_options(SPEC, 1001)
    assert options["cap_drop"] == ["ALL"] and "cap_add" not in options
    assert options["security_opt"] == ["no-new-privileges:true"]
    assert options["read_only"] is True and options["privileged"] is False
    assert options["memswap_limit"] == options["mem_limit"] == "1024m"
    assert options["nano_cpus"] == 1_500_000_000 and options["pids_limit"] == 100
    assert set(options["tmpfs"]) == {"/tmp", "/home/runner/_work", "/home/runner/_diag"}
    assert "size=300m" in options["tmpfs"]["/tmp"]  # min(disk 300, memory/2 512)
    assert "uid=1001" in tmpfs_mounts(SPEC, 1001)["/home/runner/_work"]
    small = RunnerSpec(**{**SPEC.__dict__, "memory_mb": 256})
    assert "size=128m" in tmpfs_mounts(small, 1001)["/tmp"]


@pytest.mark.parametrize("source", ["/var/run/docker.sock", "/run/docker.sock/", "/", "/var"])
def test_the_docker_socket_is_never_mounted(source):
    with pytest.raises(ContainerStartFailed, match="never mounts"):
        assert_no_docker_socket([{"Source": "/dev/shm/runnerhub/x"}, {"Source": source}])
    assert_no_docker_socket([{"Source": "/dev/shm/runnerhub/x"}])
