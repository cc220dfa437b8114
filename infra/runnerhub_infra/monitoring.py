"""The dashboard an operator opens first, and the alarms that page (each to the stage's SNS topic).

Every RunnerHub metric named here is one the code emits (EMF, namespace RunnerHub: the webhook
and the reconciler through Lambda's stdout, the executor through the CloudWatch agent); the
others are AWS's own (SQS, Lambda, API Gateway, Auto Scaling). tests/infra/test_monitoring.py
reads the synthesized dashboard and alarms and checks each name against what the code emitted
during the tests. docs/operations.md says what each alarm means and what to do.
"""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from runnerhub_infra.control_plane import ControlPlane
from runnerhub_infra.data import Data
from runnerhub_infra.executors import Executors
from runnerhub_infra.image_refresh import ImageRefreshFunction
from runnerhub_infra.management_api import API_STAGE as MANAGEMENT_API_STAGE
from runnerhub_infra.management_api import ManagementApi
from runnerhub_infra.stages import StageSettings
from runnerhub_infra.trainer import Trainer

NAMESPACE = "RunnerHub"
# The executor publishes the least budget left across its Apps (executor/metrics.py).
APP_BUDGET_METRIC = "GitHubAppBudgetRemaining"
APP_BUDGET_ALARM_PERCENT = 10
# Demand older than this waits on capacity that is not coming (hosts not booting, a pool at its
# maximum, executors down): pickup is targeted in seconds.
OLDEST_DEMAND_ALARM_S = 300
# The reconciler runs every minute; none for this long means it is not running.
RECONCILER_MISSING_MINUTES = 10
# The scaler runs every minute (and on new demand); none for this long means it is not running.
SCALER_MISSING_MINUTES = 10
# A rollout stuck this long (the scaler reports it every run) needs an operator.
ROLLOUT_STALLED_MINUTES = 30
# The trainer runs daily: a day is its alarms' period; two days without a run is missing.
DAY = cdk.Duration.days(1)
TRAINER_MISSING_DAYS = 2
# Chalice's API Gateway stage (control_plane.py).
API_STAGE = "api"
JOB_STATES = ("waiting", "received", "dispatched", "claimed", "runner_started", "in_progress")
WEBHOOK_ANSWERS = ("2xx", "4xx", "5xx")
RUN_ACTIONS = (
    "RunRedelivered",
    "RunReDemanded",
    "RunMovedForward",
    "RunOrphansDeleted",
    "RunDeadLetterRedriven",
    "RunDeadLetterDropped",
    "RunJobDiscovered",
    "RunRedeliveryAbandoned",
)
MINUTE = cdk.Duration.minutes(1)
FIVE_MINUTES = cdk.Duration.minutes(5)


def _metric(name: str, dimensions: dict[str, str], statistic: str = "Sum",
            period: cdk.Duration = MINUTE, label: str | None = None) -> cloudwatch.Metric:
    return cloudwatch.Metric(namespace=NAMESPACE, metric_name=name, dimensions_map=dimensions,
                             statistic=statistic, period=period, label=label)


def _service(name: str, service: str, **kwargs) -> cloudwatch.Metric:
    """A metric the code counts without a dimension of its own: it carries `service`."""
    return _metric(name, {"service": service}, **kwargs)


class Monitoring(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        stage: StageSettings,
        data: Data,
        control_plane: ControlPlane,
        executors: Executors,
        trainer: Trainer,
        management_api: ManagementApi | None = None,
        image_refresh: ImageRefreshFunction | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.management_api = management_api
        self.image_refresh = image_refresh
        self.trainer_function = trainer.function_name
        self.stage = stage
        self.data = data
        self.pools = sorted(data.queues)
        self.webhook_function = f"{stage.prefix}webhook"
        self.reconciler_function = f"{stage.prefix}reconciler"
        self.scaler_function = f"{stage.prefix}scaler"
        missing = {"webhook", "reconciler", "scaler"} - set(control_plane.roles)
        if missing:
            raise ValueError(f"no function to monitor for: {', '.join(sorted(missing))}")
        # The REST API's name is its metrics' dimension: Chalice names it after the app, so two
        # stages in one account would share their API metrics. Named per stage here.
        self.api_name = f"{stage.prefix}api"
        control_plane.chalice.get_resource("RestAPI").add_property_override(
            "Name", self.api_name)
        self.groups = {pool: executors.groups[pool].auto_scaling_group_name
                       for pool in self.pools}

        self.topic = sns.Topic(self, "AlarmTopic", topic_name=f"{stage.prefix}alarms",
                               display_name=f"RunnerHub {stage.name} alarms")
        if stage.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(stage.alarm_email))
        self.alarms: dict[str, cloudwatch.Alarm] = {}
        self._alarms()
        self.dashboard = self._dashboard()
        cdk.CfnOutput(cdk.Stack.of(self), "AlarmTopicArn", value=self.topic.topic_arn,
                      description="SNS topic of every RunnerHub alarm (subscribe on-call here)")
        cdk.CfnOutput(cdk.Stack.of(self), "DashboardName",
                      value=self.dashboard.dashboard_name,
                      description="The CloudWatch dashboard an operator opens first")

    # --- alarms ---

    def _alarm(self, alarm_id: str, description: str, metric: cloudwatch.IMetric,
               threshold: float, comparison: cloudwatch.ComparisonOperator, periods: int,
               missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
               ) -> cloudwatch.Alarm:
        alarm = cloudwatch.Alarm(
            self, alarm_id,
            alarm_name=f"{self.stage.prefix}{alarm_id}",
            alarm_description=f"{description} (docs/operations.md, alarm {alarm_id})",
            metric=metric, threshold=threshold, comparison_operator=comparison,
            evaluation_periods=periods, treat_missing_data=missing,
        )
        action = cloudwatch_actions.SnsAction(self.topic)
        alarm.add_alarm_action(action)
        alarm.add_ok_action(action)
        self.alarms[alarm_id] = alarm
        return alarm

    def _alarms(self) -> None:
        above, below = (cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                        cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD)
        self.app_budget_alarm = self._alarm(
            "GitHubAppBudgetLow",
            f"A GitHub App has less than {APP_BUDGET_ALARM_PERCENT} % of its rate limit left: "
            "runner registrations will slow down",
            _metric(APP_BUDGET_METRIC, {"component": "executor"}, "Minimum"),
            APP_BUDGET_ALARM_PERCENT, below, 3,
        )
        self.dead_letter_alarms = {}
        self.oldest_demand_alarms = {}
        for pool in self.pools:
            queues = self.data.queues[pool]
            self.dead_letter_alarms[pool] = self._alarm(
                f"{pool}-dlq",
                f"Demand messages of pool {pool} in its dead-letter queue",
                queues.dead_letter_queue.metric_approximate_number_of_messages_visible(
                    period=FIVE_MINUTES, statistic="Maximum"),
                0, above, 1,
            )
            self.oldest_demand_alarms[pool] = self._alarm(
                f"{pool}-oldest-demand",
                f"Demand of pool {pool} older than {OLDEST_DEMAND_ALARM_S} s: jobs wait for "
                "capacity",
                queues.queue.metric_approximate_age_of_oldest_message(
                    period=MINUTE, statistic="Maximum"),
                OLDEST_DEMAND_ALARM_S, above, 5,
            )
        self._alarm(
            "WebhookErrors",
            "The webhook answered GitHub with 5xx: those deliveries wait for redelivery",
            cloudwatch.Metric(namespace="AWS/ApiGateway", metric_name="5XXError",
                              dimensions_map={"ApiName": self.api_name, "Stage": API_STAGE},
                              statistic="Sum", period=FIVE_MINUTES),
            0, above, 1,
        )
        self._alarm(
            "ReconcilerFailing",
            "Reconciler runs end in an error (crash or time-out) two periods in a row",
            self._lambda("Errors", self.reconciler_function, FIVE_MINUTES),
            0, above, 2,
        )
        self._alarm(
            "ReconcilerStepsFailing",
            "A reconciler step failed in every run for 15 minutes (GitHub or AWS unreachable)",
            _metric("RunReconcileErrors", {"service": "reconciler"}, "Minimum", FIVE_MINUTES),
            0, above, 3,
        )
        self._alarm(
            "ReconcilerMissing",
            f"No reconciler run acted for {RECONCILER_MISSING_MINUTES} minutes: lost webhooks "
            "and stuck jobs are not repaired",
            _service("ReconcileRuns", "reconciler", period=cdk.Duration.minutes(
                RECONCILER_MISSING_MINUTES)),
            1, below, 1, missing=cloudwatch.TreatMissingData.BREACHING,
        )
        self._alarm(
            "ScalerFailing",
            "Scaler invocations end in an error (crash or time-out) two periods in a row: "
            "hosts are neither added nor retired",
            self._lambda("Errors", self.scaler_function, FIVE_MINUTES),
            0, above, 2,
        )
        self._alarm(
            "ScalerRunsFailing",
            "Scaler runs failed (an AWS or GitHub call, or a pool without its group) in two "
            "5-minute periods in a row",
            _service("ScalerRunFailed", "scaler", period=FIVE_MINUTES),
            0, above, 2,
        )
        self._alarm(
            "ScalerMissing",
            f"No scaler run for {SCALER_MISSING_MINUTES} minutes: demand does not raise "
            "capacity and idle hosts are not retired",
            _service("ScalerRuns", "scaler", period=cdk.Duration.minutes(
                SCALER_MISSING_MINUTES)),
            1, below, 1, missing=cloudwatch.TreatMissingData.BREACHING,
        )
        # Executor rollouts (the scaler replaces hosts of an older launch template version).
        self._alarm(
            "RolloutRolledBack",
            "An executor rollout was rolled back: its new hosts failed their health (heartbeat "
            "missing, start failures); the group runs the previous launch template version",
            _service("RolloutRolledBack", "scaler", period=FIVE_MINUTES),
            0, above, 1,
        )
        self._alarm(
            "RolloutStalled",
            f"An executor rollout has been stalled for {ROLLOUT_STALLED_MINUTES} minutes (its "
            "rollback failed too, or it ran past 3 hours): hosts of two launch template "
            "versions keep serving until someone sets a version",
            _service("RolloutStalled", "scaler", statistic="Maximum", period=FIVE_MINUTES),
            0, above, ROLLOUT_STALLED_MINUTES // 5,
        )
        self._alarm(
            "TrainerFailing",
            "A trainer run ended in an error (crash or time-out): every pool keeps its previous "
            "forecast",
            self._lambda("Errors", self.trainer_function, DAY),
            0, above, 1,
        )
        self._alarm(
            "TrainerPoolsFailing",
            "The trainer could not train a pool's forecast (history unreadable, a fit or a "
            "write failed): that pool keeps its previous forecast, unapplied after 48 h",
            _service("TrainerPoolFailed", "trainer", period=DAY),
            0, above, 1,
        )
        self._alarm(
            "TrainerMissing",
            f"No trainer run for {TRAINER_MISSING_DAYS} days: forecasts go stale and the scaler "
            "turns reactive only",
            _service("TrainerRuns", "trainer", period=DAY),
            1, below, TRAINER_MISSING_DAYS, missing=cloudwatch.TreatMissingData.BREACHING,
        )
        self._alarm(
            "RunnerVersionTooOld",
            "GitHub refused runners as below its minimum version: a pool's image is too old "
            "and its jobs wait (re-demanded) until the pool's image is updated",
            _metric("RunnerVersionRejected", {"component": "executor"}, period=FIVE_MINUTES),
            0, above, 1,
        )
        self._alarm(
            "JobFlagged",
            "A job is flagged: its runner failed to start too many times in a row",
            _service("JobsFlagged", "reconciler", statistic="Maximum", period=FIVE_MINUTES),
            0, above, 1,
        )

        if self.management_api is not None:
            self._management_api_alarms(above)
        if self.image_refresh is not None:
            # Lambda retries a failed event twice; then that push's proposal is lost (the
            # next build skips the version's existing tag).
            self._alarm(
                "ImageRefreshFailing",
                "The image refresh function failed on a runner image's scan event (crash or "
                "time-out): that image was neither proposed nor applied",
                self._lambda("Errors", self.image_refresh.function_name, FIVE_MINUTES),
                0, above, 1,
            )

    def _management_api_alarms(self, above: cloudwatch.ComparisonOperator) -> None:
        api = self.management_api
        self._alarm(
            "ManagementApiErrors",
            "The management API answered 5xx (its function failed or timed out) in two "
            "5-minute periods in a row",
            cloudwatch.Metric(namespace="AWS/ApiGateway", metric_name="5XXError",
                              dimensions_map={"ApiName": api.api_name,
                                              "Stage": MANAGEMENT_API_STAGE},
                              statistic="Sum", period=FIVE_MINUTES),
            0, above, 2,
        )
        self._alarm(
            "ManagementApiThrottled",
            "Lambda throttled the management API's function (the account's concurrency is "
            "spent): the dashboard and operators' actions fail",
            self._lambda("Throttles", api.function_name, FIVE_MINUTES),
            0, above, 1,
        )

    # --- the dashboard ---

    def _lambda(self, name: str, function: str, period: cdk.Duration = MINUTE,
                statistic: str = "Sum", label: str | None = None) -> cloudwatch.Metric:
        return cloudwatch.Metric(namespace="AWS/Lambda", metric_name=name,
                                 dimensions_map={"FunctionName": function},
                                 statistic=statistic, period=period, label=label)

    def _per_pool(self, make) -> list[cloudwatch.IMetric]:
        return [make(pool) for pool in self.pools]

    def _dashboard(self) -> cloudwatch.Dashboard:
        def graph(title: str, left: list, right: list | None = None, **kwargs):
            return cloudwatch.GraphWidget(title=title, left=left, right=right or [],
                                          width=8, height=6, **kwargs)

        queues = self.data.queues
        demand = [
            graph("Demand backlog per pool (messages)", self._per_pool(
                lambda p: queues[p].queue.metric_approximate_number_of_messages_visible(
                    period=MINUTE, statistic="Maximum", label=p))),
            graph("Oldest demand per pool (s)", self._per_pool(
                lambda p: queues[p].queue.metric_approximate_age_of_oldest_message(
                    period=MINUTE, statistic="Maximum", label=p)),
                left_annotations=[cloudwatch.HorizontalAnnotation(
                    value=OLDEST_DEMAND_ALARM_S, label="alarm")]),
            graph("Dead-lettered demand per pool (messages)", self._per_pool(
                lambda p: queues[p].dead_letter_queue.metric_approximate_number_of_messages_visible(
                    period=MINUTE, statistic="Maximum", label=p))),
        ]
        capacity = [
            graph("Open jobs by state", [
                _metric("JobsOpen", {"state": state}, "Maximum", label=state)
                for state in JOB_STATES], stacked=True),
            graph("Pickup per pool, demand to runner started (s): p50, p95", [
                _metric("PickupSeconds", {"pool": pool}, stat, label=f"{pool} {stat}")
                for pool in self.pools for stat in ("p50", "p95")]),
            graph("Hosts per pool: desired, in service", [
                cloudwatch.Metric(namespace="AWS/AutoScaling", metric_name=name,
                                  dimensions_map={"AutoScalingGroupName": self.groups[pool]},
                                  statistic="Maximum", period=MINUTE, label=f"{pool} {what}")
                for pool in self.pools
                for name, what in (("GroupDesiredCapacity", "desired"),
                                   ("GroupInServiceInstances", "in service"))]),
        ]
        webhook = [
            graph("Runner slots per pool: busy, free", [
                _metric(name, {"pool": pool}, label=f"{pool} {name[5:].lower()}")
                for pool in self.pools for name in ("SlotsBusy", "SlotsFree")]),
            graph("Webhook requests by answer", [
                _metric("WebhookAnswered", {"status": status}, label=status)
                for status in WEBHOOK_ANSWERS], right=[
                cloudwatch.Metric(namespace="AWS/ApiGateway", metric_name="5XXError",
                                  dimensions_map={"ApiName": self.api_name, "Stage": API_STAGE},
                                  statistic="Sum", period=MINUTE, label="API Gateway 5xx")]),
            graph("Webhook function: duration p99 (ms), throttles, errors",
                  [self._lambda("Duration", self.webhook_function, statistic="p99",
                                label="duration p99")],
                  right=[self._lambda("Throttles", self.webhook_function, label="throttles"),
                         self._lambda("Errors", self.webhook_function, label="errors")]),
        ]
        reconciler = [
            graph("Reconciler runs", [
                _service("ReconcileRuns", "reconciler", label="runs that acted"),
            ], right=[
                _service("RunReconcileErrors", "reconciler", label="step errors"),
                self._lambda("Errors", self.reconciler_function, label="failed runs"),
            ]),
            graph("What the reconciler runs did", [
                _service(name, "reconciler", label=name.removeprefix("Run"))
                for name in RUN_ACTIONS], stacked=True),
            graph("GitHub App budget left (%), flagged jobs", [
                _metric(APP_BUDGET_METRIC, {"component": "executor"}, "Minimum",
                        label="least of the Apps"),
                cloudwatch.MathExpression(
                    expression=("SEARCH('{RunnerHub,app_id} MetricName=\""
                                f"{APP_BUDGET_METRIC}\"', 'Minimum', 60)"),
                    label="", period=MINUTE),
            ], right=[_service("JobsFlagged", "reconciler", statistic="Maximum",
                               label="flagged jobs")],
                left_annotations=[cloudwatch.HorizontalAnnotation(
                    value=APP_BUDGET_ALARM_PERCENT, label="alarm")]),
        ]
        scaler = [
            graph("Scaler: desired hosts per pool, in service", [
                _metric("PoolDesiredHosts", {"pool": pool}, "Maximum", label=f"{pool} desired")
                for pool in self.pools], right=[
                cloudwatch.Metric(namespace="AWS/AutoScaling",
                                  metric_name="GroupInServiceInstances",
                                  dimensions_map={"AutoScalingGroupName": self.groups[pool]},
                                  statistic="Maximum", period=MINUTE,
                                  label=f"{pool} in service")
                for pool in self.pools]),
            graph("Scaler: backlog and free slots per pool", [
                _metric("PoolBacklog", {"pool": pool}, "Maximum", label=f"{pool} backlog")
                for pool in self.pools], right=[
                _metric("PoolFreeSlots", {"pool": pool}, "Minimum", label=f"{pool} free")
                for pool in self.pools]),
            graph("Scaler runs", [_service("ScalerRuns", "scaler", label="runs")], right=[
                _service("ScalerRunFailed", "scaler", label="failed runs"),
                self._lambda("Errors", self.scaler_function, label="failed invocations"),
            ]),
            graph("Executor rollouts: rolled back, stalled", [
                _service("RolloutRolledBack", "scaler", label="rolled back"),
                _service("RolloutStalled", "scaler", statistic="Maximum", label="stalled"),
            ]),
        ]
        alarms = cloudwatch.AlarmStatusWidget(
            title="Alarms", alarms=list(self.alarms.values()), width=24, height=4)
        return cloudwatch.Dashboard(
            self, "Dashboard",
            dashboard_name=f"{self.stage.prefix}overview",
            widgets=[[alarms], demand, capacity, scaler, webhook, reconciler],
        )
