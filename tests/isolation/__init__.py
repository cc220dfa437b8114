"""Isolation tests (issue 18): real containers, real iptables, on this machine."""
