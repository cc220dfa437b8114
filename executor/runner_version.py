"""GitHub's refusal of a runner below its minimum version, read from the runner's own log.

A runner GitHub considers too old registers (its JIT config works) and is then refused when it
opens its session to listen for jobs; the real `Runner.Listener` prints "An error occurred:
Runner version v2.x.y is deprecated and cannot receive messages." and exits 1 ("terminated
error, no retry"); the stand-in runner (emulator/standin_runner.py) prints the same line. The
exit code alone says nothing (1 is any failure): the line is what tells this apart, so the
executor reads the exited container's log tail (`RunnerContainers.log_tail`). Pure.
"""

from __future__ import annotations

import re

# GitHub's wording has varied ("occurred"/"occured", "Error: Forbidden " before it: actions/
# runner#3381, #3658): the version and the tail of the sentence are what stay.
_REFUSED = re.compile(r"Runner version v?(?P<version>\d+\.\d+\.\d+) is deprecated and cannot "
                      r"receive messages")
# Lines of the log tail read: the refusal is among the runner's last words.
TAIL_LINES = 20


def rejected_version(log_tail: str) -> str | None:
    """The version GitHub refused, if the log says it did; else None."""
    found = _REFUSED.search(log_tail or "")
    return found["version"] if found else None
