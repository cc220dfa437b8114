"""A local fleet: Auto Scaling groups in moto whose instances become executor daemons.

Per pool, one group (launch template + group, new instances protected from scale-in, as infra/
makes them) in the local AWS. Whatever sets the group's desired capacity (the scaler, a test,
a person with the AWS CLI) makes moto launch or terminate instances; the fleet watches the
groups and plays the EC2 part: an instance becomes an executor daemon (`python -m executor`,
host id = instance id) `boot_delay_s` after it appears, and its daemon gets SIGTERM when the
instance leaves the group (terminated). moto has no lifecycle hooks that hold an instance, no
instance refresh and no per-instance metadata: docs/scaling.md says where the fleet differs.
With `lifecycle_hook`, the fleet plays the terminating hook itself: an instance that leaves its
group while its daemon runs gets target lifecycle state `Terminated` from its metadata stand-in
and is held until its daemon has drained and exited (as the hook holds it in Terminating:Wait).

Releases: `release(pool, ami)` makes a new launch template version with that AMI and sets it on
the group, as a deploy does; `amis` maps an AMI to the executor settings it carries (a broken
build is an AMI whose settings stop the daemon at start), so hosts of different versions run
different daemons.

Its record (`launched`, `ended`, `samples`) is the fleet's own observation of the groups, for
the demo's hosts-over-time table and the benchmark's instance-seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from chalicelib import aws
from devstack.imds import ImdsStandIn
from devstack.stack import APP_ID, Child, LocalStack, environ

# moto accepts any well-formed AMI id; this one stands for the executor AMI.
LOCAL_AMI = "ami-0e5e1ec0e5e1ec0e5"
LOCAL_AZ = "us-east-1a"


@dataclass
class Instance:
    instance_id: str
    pool: str
    launched_at: float  # when the fleet first saw it in its group (wall clock)
    daemon: Child | None = None
    imds: ImdsStandIn | None = None
    ended_at: float | None = None  # when it left the group


@dataclass(frozen=True)
class Sample:
    at: float
    pool: str
    desired: int
    instances: int  # in the group (booting or serving)
    serving: int  # with a live daemon


@dataclass
class LocalFleet:
    stack: LocalStack
    boot_delay_s: float = 2.0
    slots: int = 4
    min_hosts: dict[str, int] = field(default_factory=dict)
    max_hosts: dict[str, int] = field(default_factory=dict)
    poll_s: float = 0.2
    # Extra executor settings (RUNNERHUB_* -> value) for every daemon.
    executor_env: dict[str, str] = field(default_factory=dict)
    # AMI -> extra executor settings of the hosts launched from it (`release`).
    amis: dict[str, dict[str, str]] = field(default_factory=dict)
    # Play the terminating lifecycle hook: drain through IMDS, hold until the daemon exits.
    lifecycle_hook: bool = False
    hook_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stoppers: list[threading.Thread] = []
        self.errors: list[str] = []
        self.ami_of: dict[str, str] = {}  # instance id -> its AMI (with `amis`)

    # --- set-up ---

    def group_name(self, pool: str) -> str:
        return f"{self.stack.prefix}{pool}"

    def max_for(self, pool: str) -> int:
        if pool in self.max_hosts:
            return self.max_hosts[pool]
        runners = self.stack.pools.by_name(pool).max_runners
        return -(-runners // self.slots)

    def start(self) -> LocalFleet:
        with environ(self.stack.direct_env):
            ec2, autoscaling = aws.client("ec2"), aws.client("autoscaling")
            for pool in self.stack.pools.names:
                name = self.group_name(pool)
                ec2.create_launch_template(
                    LaunchTemplateName=name,
                    LaunchTemplateData={"ImageId": LOCAL_AMI, "InstanceType": "m6i.xlarge"})
                minimum = self.min_hosts.get(pool, 0)
                autoscaling.create_auto_scaling_group(
                    AutoScalingGroupName=name,
                    # A pinned number, as infra/ pins it (a rollout compares hosts with it).
                    LaunchTemplate={"LaunchTemplateName": name, "Version": "1"},
                    MinSize=minimum, MaxSize=self.max_for(pool), DesiredCapacity=minimum,
                    AvailabilityZones=[LOCAL_AZ],
                    # As in infra/: only the scaler picks which instance goes.
                    NewInstancesProtectedFromScaleIn=True,
                    Tags=[{"Key": "runnerhub:pool", "Value": pool, "PropagateAtLaunch": True}],
                )
        self._thread = threading.Thread(target=self._watch, name="local-fleet", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for instance in list(self.instances.values()):
            if instance.daemon is not None:
                self.stack.stop_child(instance.daemon)
            if instance.ended_at is None:
                instance.ended_at = time.time()
        for stopper in self._stoppers:
            stopper.join(timeout=120)
        for instance in list(self.instances.values()):
            if instance.imds is not None:
                instance.imds.stop()

    def start_scaler(self, every_s: float = 30.0, idle_s: float = 20.0,
                     **overrides: str) -> Child:
        """The scaler (devstack/local_scaler.py: stream poller + schedule) driving the groups."""
        env = {
            **self.stack.env,
            "RUNNERHUB_DEPLOYABLE": "scaler",
            "RUNNERHUB_GITHUB_API_URL": self.stack.emulator.base_url,
            "RUNNERHUB_GITHUB_APP_ID": str(APP_ID),
            "RUNNERHUB_GITHUB_APP_KEY_FILE": str(self.stack.app_key_file),
            "RUNNERHUB_SCALER_GROUP_PREFIX": self.stack.prefix,
            "RUNNERHUB_SLOTS": str(self.slots),
            "RUNNERHUB_SCALER_IDLE_S": str(idle_s),
            # Booting takes boot_delay_s here; an instance silent far longer is stuck.
            "RUNNERHUB_SCALER_BOOT_TIMEOUT_S": str(max(60.0, 10 * self.boot_delay_s)),
            **overrides,
        }
        return self.stack._spawn("scaler", [sys.executable, "-m", "devstack.local_scaler",
                                            "--every", str(every_s)], env=env)

    def release(self, pool: str, ami: str) -> str:
        """A deploy: a new launch template version launching `ami`, set on the pool's group
        (its number pinned, as infra/ pins it). Returns the version."""
        name = self.group_name(pool)
        with environ(self.stack.direct_env):
            made = aws.client("ec2").create_launch_template_version(
                LaunchTemplateName=name, SourceVersion="$Latest",
                LaunchTemplateData={"ImageId": ami})
            version = str(made["LaunchTemplateVersion"]["VersionNumber"])
            aws.client("autoscaling").update_auto_scaling_group(
                AutoScalingGroupName=name,
                LaunchTemplate={"LaunchTemplateName": name, "Version": version})
        return version

    def versions(self, pool: str) -> dict[str, str]:
        """Instance id -> the launch template version it was launched with (in the group)."""
        with environ(self.stack.direct_env):
            group = aws.client("autoscaling").describe_auto_scaling_groups(
                AutoScalingGroupNames=[self.group_name(pool)])["AutoScalingGroups"][0]
        return {i["InstanceId"]: (i.get("LaunchTemplate") or {}).get("Version", "")
                for i in group["Instances"]}

    def group_version(self, pool: str) -> str:
        with environ(self.stack.direct_env):
            group = aws.client("autoscaling").describe_auto_scaling_groups(
                AutoScalingGroupNames=[self.group_name(pool)])["AutoScalingGroups"][0]
        return str(group["LaunchTemplate"]["Version"])

    def refresh(self, pool: str, timeout_s: float = 300.0) -> list[str]:
        """An instance refresh of `pool`, one instance at a time, as Auto Scaling's with a
        terminating lifecycle hook: the instance's metadata says `Terminated`, its daemon
        drains and exits (the hook held until then), then the instance is terminated and a
        replacement launches. Returns the replaced instance ids."""
        replaced = []
        for instance in self.live(pool):
            if instance.daemon is None or instance.imds is None:
                continue  # still booting: nothing to drain
            instance.imds.set_target_lifecycle_state("Terminated")
            deadline = time.monotonic() + timeout_s
            while instance.daemon.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if instance.daemon.alive():
                raise TimeoutError(f"{instance.instance_id} did not drain in {timeout_s}s")
            with environ(self.stack.direct_env):
                aws.client("autoscaling").terminate_instance_in_auto_scaling_group(
                    InstanceId=instance.instance_id, ShouldDecrementDesiredCapacity=False)
            replaced.append(instance.instance_id)
        return replaced

    # --- the watch loop ---

    def _watch(self) -> None:
        with environ(self.stack.direct_env):
            autoscaling = aws.client("autoscaling")
            while not self._stop.is_set():
                try:
                    self._observe(autoscaling)
                except Exception as exc:  # noqa: BLE001 - kept and shown; the loop goes on
                    self.errors.append(repr(exc))
                self._stop.wait(self.poll_s)

    def _observe(self, autoscaling: Any) -> None:
        names = [self.group_name(pool) for pool in self.stack.pools.names]
        groups = autoscaling.describe_auto_scaling_groups(
            AutoScalingGroupNames=names)["AutoScalingGroups"]
        now = time.time()
        with self._lock:
            for group in groups:
                pool = group["AutoScalingGroupName"].removeprefix(self.stack.prefix)
                present = {i["InstanceId"] for i in group["Instances"]
                           if i["LifecycleState"] in ("Pending", "InService")}
                for instance_id in present - self.instances.keys():
                    self.instances[instance_id] = Instance(instance_id, pool, now)
                for instance in self.instances.values():
                    if instance.pool != pool or instance.ended_at is not None:
                        continue
                    if instance.instance_id not in present:
                        self._terminate(instance, now)
                    elif instance.daemon is None and now - instance.launched_at >= \
                            self.boot_delay_s:
                        instance.daemon = self._boot(instance)
                serving = sum(1 for i in self.instances.values()
                              if i.pool == pool and i.ended_at is None and i.daemon is not None
                              and i.daemon.alive())
                self.samples.append(Sample(now, pool, group["DesiredCapacity"], len(present),
                                           serving))

    def _boot(self, instance: Instance) -> Child:
        instance.imds = ImdsStandIn(instance.instance_id).start()
        return self.stack.start_executor(
            instance.instance_id,
            RUNNERHUB_EXECUTOR_POOLS=instance.pool,
            RUNNERHUB_SLOTS=str(self.slots),
            RUNNERHUB_IMDS_ENDPOINT=instance.imds.endpoint,
            **(self.executor_env | self.amis.get(self._ami(instance.instance_id), {})),
        )

    def _ami(self, instance_id: str) -> str:
        if not self.amis:
            return LOCAL_AMI
        with environ(self.stack.direct_env):
            found = aws.client("ec2").describe_instances(InstanceIds=[instance_id])
        self.ami_of[instance_id] = found["Reservations"][0]["Instances"][0]["ImageId"]
        return self.ami_of[instance_id]

    def _terminate(self, instance: Instance, now: float) -> None:
        instance.ended_at = now
        if instance.daemon is None:
            return  # terminated while booting: nothing ran on it
        # Off the watch thread: a drain can take as long as a job.
        if self.lifecycle_hook and instance.imds is not None and instance.daemon.alive():
            stopper = threading.Thread(target=self._hold, args=(instance,),
                                       name=f"hook-{instance.instance_id}", daemon=True)
        else:
            # SIGTERM, as EC2's shutdown does to systemd's unit; the daemon drains.
            stopper = threading.Thread(target=self.stack.stop_child, args=(instance.daemon,),
                                       name=f"stop-{instance.instance_id}", daemon=True)
        stopper.start()
        self._stoppers.append(stopper)

    def _hold(self, instance: Instance) -> None:
        """The terminating hook: the metadata says Terminated, the daemon drains (running jobs
        finish) and exits; only then is the instance gone. SIGTERM after `hook_timeout_s`."""
        assert instance.imds is not None and instance.daemon is not None
        instance.imds.set_target_lifecycle_state("Terminated")
        deadline = time.monotonic() + self.hook_timeout_s
        while instance.daemon.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if instance.daemon.alive():
            self.errors.append(f"{instance.instance_id}: not drained in {self.hook_timeout_s}s")
            self.stack.stop_child(instance.daemon)

    # --- reading the record ---

    def live(self, pool: str) -> list[Instance]:
        with self._lock:
            return [i for i in self.instances.values() if i.pool == pool and i.ended_at is None]

    def terminated(self) -> dict[str, float]:
        """Instance id -> when it left its group, for the instances that have (call it before
        `stop()`, which ends the rest)."""
        with self._lock:
            return {i.instance_id: i.ended_at for i in self.instances.values()
                    if i.ended_at is not None}

    def instance_seconds(self, until: float | None = None) -> float:
        until = until or time.time()
        with self._lock:
            return sum((i.ended_at or until) - i.launched_at for i in self.instances.values())

    def hosts_over_time(self, every_s: float = 5.0) -> list[dict[str, Any]]:
        """One row per poll that changed a pool's instance count, and at least one per
        `every_s`: seconds since the first poll, then instances per pool."""
        with self._lock:
            samples = list(self.samples)
        polls: dict[float, dict[str, int]] = {}
        for sample in samples:  # one poll's samples share its time
            polls.setdefault(sample.at, {})[sample.pool] = sample.instances
        rows: list[dict[str, Any]] = []
        last: dict[str, int] | None = None
        last_at = start = min(polls, default=0.0)
        for at, counts in sorted(polls.items()):
            if counts != last or at - last_at >= every_s:
                rows.append({"t_s": round(at - start, 1), **dict(sorted(counts.items()))})
                last, last_at = counts, at
        return rows
