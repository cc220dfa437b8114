"""Moved to `chalicelib.github.apps`; this path stays only for `executor/__main__.py`, which
imports it from here (remove once it imports `chalicelib.github.GitHubApps`)."""

from chalicelib.github.apps import GitHubApps

__all__ = ["GitHubApps"]
