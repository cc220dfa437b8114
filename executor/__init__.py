"""The executor daemon: claims demand from SQS and meets it with ephemeral runner containers."""

# Written into the host's heartbeat record (chalicelib/hosts.py): what a rolling upgrade checks.
__version__ = "0.2.0"
