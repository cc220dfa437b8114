"""The executor daemon: claims demand from SQS and meets it with ephemeral runner containers."""
