"""Files written whole or not at all, and the temporaries a killed run leaves behind.

A file is written to a temporary beside it and renamed over the target, so a crash never leaves half a file. The
temporary's name carries the host and the process that writes it, ``.NAME.HOST.PID.RANDOM.tmp``, so the next run
can tell a dead run's leftovers (this host, process gone) from a live concurrent run's file in progress, and
removes only the former (and anything older than a day, whoever wrote it).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
STALE_AFTER_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"


def temporary_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``path`` (made readable: a report is meant to be
    shared), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> Path:
    """``data`` to ``path``, flushed to disk before the rename."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporaries of runs that died in ``directory`` (not recursively); return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed, now, host = [], time.time(), _host()
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or not path.is_file():
            continue
        dead = match["host"] == host and not _alive(int(match["pid"]))
        if dead or now - path.stat().st_mtime > STALE_AFTER_SECONDS:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
