"""Atomic writes and hashing: nothing we write is ever seen half-written.

Files go to a temporary name in the same directory and are renamed into place; directories are
built under a temporary sibling and renamed (the previous directory, if any, is replaced only once
the new one is complete).

Temporaries are named `.NAME.<host>-<pid>.*.tmp` (and `.old` for a directory being replaced). A
writer that was killed leaves its temporary behind; the next write to the same path on the same
host deletes temporaries whose process is gone, and puts back a `.old` directory if the kill came
in the instant between its two renames (so the previous directory is never lost).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete the temporaries of killed writers of `path` on this host; restore an orphaned `.old`."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.{socket.gethostname()}-") + r"(\d+)\..*\.(tmp|old)$")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        if m.group(2) == "old" and not path.exists():
            os.replace(p, path)  # killed between moving the old directory aside and renaming the new one in
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    If `path` exists it is moved aside first and deleted only after the new one is in place,
    so a crash leaves either the old directory or the new one (plus a stray temporary).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise LdmError before work starts when the disk holding `path` has less than `need_bytes` free."""
    from ldm_deploy.errors import LdmError

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise LdmError(
            f"not enough disk space for {what}: {need_bytes / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free at {probe}",
            hint="free some space or choose another --out",
        )
