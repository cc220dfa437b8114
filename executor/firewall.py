"""The hardened profile's firewall: one iptables chain, RUNNERHUB, with rules per job network.

The chain lives in the `mangle` table and is jumped to from its FORWARD (traffic a job forwards
through the host: the metadata address on EC2, the internet, other networks) and INPUT (traffic
to the host's own addresses) chains. Not the `filter` table's DOCKER-USER: Docker rewrites the
filter table's FORWARD chain whenever it makes a network (it inserts the new bridge's ACCEPT
rules at the top, then deletes and re-inserts its DOCKER-USER jump above them), and a job whose
connection fell in that gap reached the metadata address (tests/isolation/test_hardened.py
caught it in most runs on a busy machine). Docker never touches `mangle`, whose hooks run before
`filter`'s; a DROP there is final, a RETURN lets Docker's own filter rules decide.

Every rule matches the job network's bridge (`-i br-...`) and carries the comment
`runnerhub:<network>:<kind>`, so a network's rules are found, counted and removed by name:

  imds    DROP to 169.254.0.0/16: the instance metadata service and every link-local address
  host    DROP new connections to any of the host's own addresses (replies to connections the
          host opened still pass)
  self    RETURN for traffic within the network (its sibling engine: Docker decides)
  jobs    DROP to any other Docker bridge network (`br-+`, `docker0`): other jobs' containers
  allow   RETURN for each `egress_allow` entry (Docker's own rules then decide; another job's
          network was dropped above, so an allowed range never opens it)
  egress  DROP everything else leaving the network (only when the pool has an allow-list)

Docker's DOCKER-ISOLATION chains drop traffic between two bridge networks too, but they hang off
the filter table's FORWARD that Docker rewrites on each new network: a job reached another
job's listener in that gap (one CI run in four), hence the `jobs` rules of our own. A DROP
rule's packet counter is what the runtime monitor reads as "tried a blocked address"
(`counters`).

The planning is pure (`job_rules`, `parse_counters`, `parse_rules`); `Firewall` runs the
`iptables` CLI, the same binary (legacy or nft) Docker uses on the host.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chalicelib.errors import RunnerHubError
from chalicelib.pools import egress_rule

CHAIN = "RUNNERHUB"
TABLE = "mangle"
PARENTS = ("FORWARD", "INPUT")
# Where earlier versions jumped from (filter table): removed on sight, so an upgraded host keeps
# one chain of rules.
LEGACY_PARENTS = ("DOCKER-USER", "FORWARD", "INPUT")
COMMENT_PREFIX = "runnerhub:"
KINDS = ("imds", "host", "self", "jobs", "allow", "egress")
LINK_LOCAL = "169.254.0.0/16"
# iptables waits this long for the xtables lock that Docker also takes.
LOCK_WAIT_S = 10
COMMAND_TIMEOUT_S = 30


class FirewallError(RunnerHubError):
    """An iptables call failed: a hardened container must not start without its rules."""


@dataclass(frozen=True)
class Rule:
    network: str
    kind: str
    spec: tuple[str, ...]  # the match and target, without the chain and the comment

    @property
    def comment(self) -> str:
        return f"{COMMENT_PREFIX}{self.network}:{self.kind}"

    def argv(self) -> list[str]:
        return [*self.spec[:-2], "-m", "comment", "--comment", self.comment, *self.spec[-2:]]


def job_rules(network: str, bridge: str, egress_allow: Sequence[str] = ()) -> list[Rule]:
    """The rules of one job network, in order. ValueError on a bad bridge or allow entry."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", bridge):
        raise ValueError(f"bridge interface name {bridge!r} is not valid")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", network):
        raise ValueError(f"network name {network!r} is not valid for a rule comment")
    rules = [
        Rule(network, "imds", ("-i", bridge, "-d", LINK_LOCAL, "-j", "DROP")),
        # Only INPUT sees local destinations; a reply to a connection the host opened is
        # ESTABLISHED and passes.
        Rule(network, "host", ("-i", bridge, "-m", "addrtype", "--dst-type", "LOCAL",
                               "-m", "conntrack", "!", "--ctstate", "ESTABLISHED,RELATED",
                               "-j", "DROP")),
    ]
    rules += [
        # Its own network (the docker profile's sibling engine): Docker decides.
        Rule(network, "self", ("-i", bridge, "-o", bridge, "-j", "RETURN")),
        # Any other Docker bridge network (other jobs' networks, docker0). Docker's own
        # isolation chains drop this too, but Docker rewrites filter's FORWARD (and those
        # chains' jump) on each new network, and a connection in that gap got through.
        Rule(network, "jobs", ("-i", bridge, "-o", "br-+", "-j", "DROP")),
        Rule(network, "jobs", ("-i", bridge, "-o", "docker0", "-j", "DROP")),
    ]
    if not egress_allow:
        return rules
    for entry in egress_allow:
        cidr, port = egress_rule(entry)
        if port is None:
            rules.append(Rule(network, "allow", ("-i", bridge, "-d", str(cidr),
                                                 "-j", "RETURN")))
            continue
        for proto in ("tcp", "udp"):  # a port is a service: DNS needs both
            rules.append(Rule(network, "allow", ("-i", bridge, "-d", str(cidr), "-p", proto,
                                                 "--dport", str(port), "-j", "RETURN")))
    # Not traffic within the network (a job's sibling engine, bridged) nor to the host (the
    # host rule above decided that already).
    rules.append(Rule(network, "egress", ("-i", bridge, "!", "-o", bridge, "-m", "addrtype",
                                          "!", "--dst-type", "LOCAL", "-j", "DROP")))
    return rules


_COMMENT = re.compile(r"/\* " + re.escape(COMMENT_PREFIX) + r"(\S+):([a-z]+) \*/")


def parse_counters(listing: str) -> dict[tuple[str, str], int]:
    """`iptables -t mangle -L RUNNERHUB -v -x -n` -> packets per (network, kind), summed over
    rules."""
    counts: dict[tuple[str, str], int] = {}
    for line in listing.splitlines():
        found = _COMMENT.search(line)
        fields = line.split()
        if not found or not fields or not fields[0].isdigit():
            continue
        key = (found.group(1), found.group(2))
        counts[key] = counts.get(key, 0) + int(fields[0])
    return counts


def parse_rules(listing: str) -> list[tuple[str, str, list[str]]]:
    """`iptables -t mangle -S RUNNERHUB` -> (network, kind, the rule's arguments after
    `-A RUNNERHUB`) for each RunnerHub rule."""
    found = []
    for line in listing.splitlines():
        argv = shlex.split(line)
        if argv[:2] != ["-A", CHAIN] or "--comment" not in argv:
            continue
        comment = argv[argv.index("--comment") + 1]
        if not comment.startswith(COMMENT_PREFIX):
            continue
        network, _, kind = comment.removeprefix(COMMENT_PREFIX).rpartition(":")
        found.append((network, kind, argv[2:]))
    return found


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          check=False)


class Firewall:
    """The RUNNERHUB chain through the iptables CLI. Every method is idempotent."""

    def __init__(self, binary: str = "iptables", run: Runner = _run) -> None:
        self._binary = binary
        self._run = run
        # Runners start on several threads: one reader-then-writer of the chain at a time.
        self._lock = threading.RLock()

    def _call(self, *args: str, check: bool = True,
              table: str = TABLE) -> subprocess.CompletedProcess:
        argv = [self._binary, "-w", str(LOCK_WAIT_S), "-t", table, *args]
        try:
            done = self._run(argv)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FirewallError(f"{shlex.join(argv)}: {exc}") from exc
        if check and done.returncode != 0:
            raise FirewallError(
                f"{shlex.join(argv)} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[:200]}")
        return done

    def ensure_chain(self) -> None:
        """The chain, and one jump to it at the top of mangle's FORWARD and INPUT. FirewallError
        when Docker's DOCKER-USER is missing: Docker runs with `iptables: false`, so its
        isolation between bridges (which jobs rely on) is not there either."""
        with self._lock:
            self._ensure_chain()

    def _ensure_chain(self) -> None:
        if self._call("-n", "-L", "DOCKER-USER", check=False, table="filter").returncode != 0:
            raise FirewallError("Docker's DOCKER-USER chain is missing (dockerd runs without "
                                "iptables): no isolation between job networks")
        self._remove_legacy_chain()
        if self._call("-n", "-L", CHAIN, check=False).returncode != 0:
            self._call("-N", CHAIN)
        for parent in PARENTS:
            if self._call("-C", parent, "-j", CHAIN, check=False).returncode != 0:
                self._call("-I", parent, "1", "-j", CHAIN)

    def _remove_legacy_chain(self) -> None:
        """The filter-table chain of earlier versions, and its jumps (gaps; see above)."""
        if self._call("-n", "-L", CHAIN, check=False, table="filter").returncode != 0:
            return
        for parent in LEGACY_PARENTS:
            for _ in range(8):  # a jump may have been added more than once
                if self._call("-D", parent, "-j", CHAIN, check=False,
                              table="filter").returncode != 0:
                    break
        self._call("-F", CHAIN, table="filter")
        self._call("-X", CHAIN, table="filter")

    def rules(self) -> list[tuple[str, str, list[str]]]:
        return parse_rules(self._call("-S", CHAIN).stdout)

    def networks(self) -> set[str]:
        """The networks that have rules."""
        return {network for network, _, _ in self.rules()}

    def apply(self, network: str, bridge: str, egress_allow: Sequence[str] = ()) -> None:
        """Make the network's rules exactly `job_rules(...)`. Already there (a restarted
        daemon adopting a runner): left alone, never a moment without them."""
        wanted = job_rules(network, bridge, egress_allow)
        with self._lock:
            self._apply(network, bridge, wanted)

    def _apply(self, network: str, bridge: str, wanted: list[Rule]) -> None:
        self._ensure_chain()  # also after someone flushed the chain or its jumps
        have = [(kind, args) for net, kind, args in self.rules() if net == network]
        if [kind for kind, _ in have] == [r.kind for r in wanted] and all(
                bridge in args for _, args in have):
            return
        if have:
            self._remove(network)
        try:
            for rule in wanted:
                self._call("-A", CHAIN, *rule.argv())
        except FirewallError:
            self._remove(network)  # never half a rule set
            raise

    def remove(self, network: str) -> int:
        """Delete the network's rules; how many there were."""
        with self._lock:
            return self._remove(network)

    def _remove(self, network: str) -> int:
        if self._call("-n", "-L", CHAIN, check=False).returncode != 0:
            return 0
        removed = 0
        for net, _, args in self.rules():
            if net == network:
                self._call("-D", CHAIN, *args)
                removed += 1
        return removed

    def counters(self) -> dict[tuple[str, str], int]:
        """Packets each (network, kind) matched: a grown DROP count is a blocked attempt."""
        return parse_counters(self._call("-L", CHAIN, "-v", "-x", "-n").stdout)
