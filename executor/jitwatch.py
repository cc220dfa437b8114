"""Delete a runner's JIT config file as soon as its runner has read it (Linux inotify).

The runner reads the file once, at start (runner-image/*entrypoint.sh: `cat`, or the stand-in's
`open`), before it registers. The file lives in a per-runner directory on a host tmpfs that is
bind-mounted read-only into the container, so deleting it on the host removes it inside the
container too (a bind-mounted FILE would stay readable through its mount). inotify reports the
container's read on the host: IN_ACCESS then IN_CLOSE_NOWRITE on the file's inode, whatever
mount it was read through. Why not wait until GitHub shows the runner online: that costs an API
call per runner and leaves the file readable for the runner's whole start-up; this deletes it
milliseconds after the read, with no API call.

The standard library has no inotify; these few ctypes calls avoid a new dependency on every
host. Without inotify (not Linux), `watch` returns False and the file stays until the container
is removed, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path

from aws_lambda_powertools import Logger

logger = Logger(service="runnerhub-executor")

IN_ACCESS = 0x001
IN_CLOSE_NOWRITE = 0x010
IN_IGNORED = 0x8000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
POLL_S = 0.5  # the thread checks for close() this often


class JitReadWatch:
    """One inotify instance and one daemon thread for all of a host's JIT config files."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[int, Path] = {}  # watch descriptor -> file
        self._accessed: set[int] = set()
        self._closed = threading.Event()
        self._fd = -1
        self._libc = None
        self._thread: threading.Thread | None = None
        self.deleted = 0  # files deleted after a read (for tests and metrics)

    def _start(self) -> bool:
        if self._fd >= 0:
            return True
        name = ctypes.util.find_library("c")
        if not name:
            return False
        try:
            libc = ctypes.CDLL(name, use_errno=True)
            fd = libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        except (OSError, AttributeError):
            return False
        if fd < 0:
            logger.warning("inotify unavailable (%s): JIT config files stay until their "
                           "container is removed", os.strerror(ctypes.get_errno()))
            return False
        self._libc, self._fd = libc, fd
        self._thread = threading.Thread(target=self._loop, name="jit-read-watch", daemon=True)
        self._thread.start()
        return True

    def watch(self, path: Path) -> bool:
        """Delete `path` once it has been read. False when it cannot be watched."""
        with self._lock:
            if not self._start():
                return False
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path),
                                              IN_ACCESS | IN_CLOSE_NOWRITE)
            if wd < 0:
                logger.warning("cannot watch %s: %s", path.name,
                               os.strerror(ctypes.get_errno()))
                return False
            self._paths[wd] = path
            return True

    def forget(self, path: Path) -> None:
        with self._lock:
            for wd, known in list(self._paths.items()):
                if known == path:
                    self._paths.pop(wd)
                    self._accessed.discard(wd)
                    if self._fd >= 0:
                        self._libc.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S * 4)
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], POLL_S)
                if ready:
                    self._handle(os.read(self._fd, 64 * 1024))
            except (OSError, ValueError):  # closed meanwhile
                if self._closed.is_set():
                    return
                logger.exception("JIT config watch failed")
                self._closed.wait(POLL_S)

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            with self._lock:
                path = self._paths.get(wd)
                if mask & IN_IGNORED:
                    self._paths.pop(wd, None)
                    self._accessed.discard(wd)
                    continue
                if path is None:
                    continue
                if mask & IN_ACCESS:
                    self._accessed.add(wd)
                # Opened and closed without reading (a `test -s`-like probe) does not count.
                if not (mask & IN_CLOSE_NOWRITE and wd in self._accessed):
                    continue
                self._paths.pop(wd, None)
                self._accessed.discard(wd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                self.deleted += 1
            logger.info("JIT config read by its runner: deleted",
                        extra={"runner": path.parent.name})
