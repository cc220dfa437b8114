"""Alarms: a GitHub App below 10 % of its budget, and demand in any pool's dead-letter queue."""

from __future__ import annotations

from tests.infra.cfn import resources as of_type


def test_app_budget_alarm_below_ten_percent(template):
    alarms = [a["Properties"] for a in of_type(template, "AWS::CloudWatch::Alarm").values()
              if a["Properties"].get("MetricName") == "GitHubAppBudgetRemaining"]
    assert len(alarms) == 1
    alarm = alarms[0]
    assert (alarm["Namespace"], alarm["Threshold"], alarm["ComparisonOperator"]) == (
        "RunnerHub", 10, "LessThanThreshold")
    assert alarm["Dimensions"] == [{"Name": "component", "Value": "executor"}]
    assert alarm["Statistic"] == "Minimum"


def test_every_pool_has_a_dead_letter_alarm(template, pools):
    alarms = [a["Properties"] for a in of_type(template, "AWS::CloudWatch::Alarm").values()
              if a["Properties"].get("MetricName") == "ApproximateNumberOfMessagesVisible"]
    assert len(alarms) == len(pools.pools)
    assert all(a["Threshold"] == 0 and a["ComparisonOperator"] == "GreaterThanThreshold"
               for a in alarms)
