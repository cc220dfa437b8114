"""CloudWatch alarms on what needs an operator: a GitHub App running out of rate-limit budget,
and demand messages landing in a pool's dead-letter queue."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from constructs import Construct

from runnerhub_infra.data import Data

# The executor publishes the least budget left across its Apps (executor/metrics.py).
APP_BUDGET_METRIC = "GitHubAppBudgetRemaining"
APP_BUDGET_ALARM_PERCENT = 10


class Monitoring(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, data: Data) -> None:
        super().__init__(scope, construct_id)
        budget = cloudwatch.Metric(
            namespace="RunnerHub",
            metric_name=APP_BUDGET_METRIC,
            dimensions_map={"component": "executor"},
            statistic="Minimum",
            period=cdk.Duration.minutes(1),
        )
        self.app_budget_alarm = cloudwatch.Alarm(
            self,
            "GitHubAppBudgetLow",
            alarm_description=(
                f"A GitHub App has less than {APP_BUDGET_ALARM_PERCENT} % of its rate limit "
                "left: runner registrations will slow down (add an App, see docs/operations.md)"
            ),
            metric=budget,
            threshold=APP_BUDGET_ALARM_PERCENT,
            comparison_operator=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            evaluation_periods=3,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        self.dead_letter_alarms = {
            pool: cloudwatch.Alarm(
                self,
                f"{pool}-dlq",
                alarm_description=f"Demand messages of pool {pool} in its dead-letter queue",
                metric=queues.dead_letter_queue.metric_approximate_number_of_messages_visible(
                    period=cdk.Duration.minutes(5), statistic="Maximum"
                ),
                threshold=0,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
                evaluation_periods=1,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
            )
            for pool, queues in data.queues.items()
        }
