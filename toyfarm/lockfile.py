"""An exclusive lock file for one writing process, that a crashed process does not leave stuck."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toyfarm.workspace import InputError

__all__ = ["exclusive"]


@contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (created atomically) while the block runs; ``what`` names the resource.

    A lock whose holder was a process on this host that no longer exists is taken over; a live
    holder, or one on another host, makes this raise an ``InputError`` naming it.
    """
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    # the lock appears with its holder already in it (a hard link of a written file): a crash
    # can never leave an empty lock that names nobody and so is never stale
    mine = lock.with_name(f"{lock.name}.{me['pid']}")
    mine.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                if not _stale(lock):
                    holder = _read(lock)
                    raise InputError(
                        f"{what} is in use by another toyfarm run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}); wait for it to finish, or remove {lock} if that "
                        "process is gone"
                    ) from None
                lock.unlink(missing_ok=True)
        else:  # another run took the stale lock over at the same moment
            raise InputError(f"{what} was just taken by another toyfarm run; try again")
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _read(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _stale(lock: Path) -> bool:
    """A lock of a process on this host that no longer exists."""
    holder = _read(lock)
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
