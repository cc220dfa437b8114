"""GitHub as RunnerHub talks to it: one App (`client.GitHubApp`), several Apps as one
(`apps.GitHubApps`), both behind the one interface `GitHubClient` (`interface`), and the
client-side rate budget each App spends (`budget`)."""

from chalicelib.github.apps import GitHubApps
from chalicelib.github.budget import BudgetLimits, Headroom, RateBudget
from chalicelib.github.client import GITHUB_API_URL, GitHubApp
from chalicelib.github.interface import (
    DeliveryPage,
    GitHubClient,
    GitHubError,
    JitRunner,
    ListPage,
    RunnerScope,
)

__all__ = [
    "GITHUB_API_URL",
    "BudgetLimits",
    "DeliveryPage",
    "GitHubApp",
    "GitHubApps",
    "GitHubClient",
    "GitHubError",
    "Headroom",
    "JitRunner",
    "ListPage",
    "RateBudget",
    "RunnerScope",
]
