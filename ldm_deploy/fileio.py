"""Atomic writes and hashing: nothing we write is ever seen half-written.

Files go to a temporary name in the same directory and are renamed into place; directories are
built under a temporary sibling and renamed (the previous directory, if any, is replaced only once
the new one is complete).

Temporaries are named `.NAME.<host>-<pid>.*.tmp` (and `.old` for a directory being replaced); a NAME
too long for that to fit in NAME_MAX (255 bytes) is cut and ends in `~` and 8 hex digits of its
hash. Files and folders are created with the process umask (0o666 / 0o777 minus it), as `open` and
`mkdir` would, not mkstemp's private 0600 / 0700. A writer that was killed leaves its temporary
behind; the next write to the same path on the same host deletes temporaries whose process is gone, and puts back a `.old` directory if the kill came
in the instant between its two renames (so the previous directory is never lost).

Replacing a folder is guarded (`check_out_dir`, called by `atomic_dir(path, kind=...)` and early by
every command that writes a folder): an existing folder is replaced only when it is empty or of the
writer's own kind (an artifact for export, a model folder we wrote for convert and training, ...),
or with `force=True`; a folder that is, lies inside, or holds one of the command's inputs is never
replaced. A `path` that is a symbolic link is written through: the folder it points to is replaced
and the link is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import fnmatch
import re
import shutil
import signal
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_regular(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a regular file, without following a symbolic link and reading at most its size
    at open time (a FIFO, a device or a link is refused: LdmError)."""
    from ldm_deploy.errors import LdmError

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if Path(path).is_symlink():
            raise LdmError(f"{path} is a symbolic link to {os.readlink(path)}; it is not hashed",
                           hint="copy the file in place of the link") from None
        raise LdmError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise LdmError(f"{path} is not a regular file (a FIFO, device or socket)", hint="remove it")
        h, left = hashlib.sha256(), st.st_size
        while left > 0 and (block := f.read(min(chunk, left))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


NAME_MAX = 255   # bytes in one path component (Linux, macOS)


def _stem(name: str) -> str:
    """`name` as it appears in its temporaries: cut (+ `~` and 8 hex of its sha256) so that
    `.STEM.<host>-<pid>.<8 random>.tmp` fits NAME_MAX whatever the pid (up to 7 digits)."""
    room = NAME_MAX - len(f"..{socket.gethostname()}-{'9' * 7}.{'x' * 8}.tmp".encode())
    if len(name.encode()) <= room:
        return name
    tag = "~" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    cut = name
    while len((cut + tag).encode("utf-8", "surrogateescape")) > room:
        cut = cut[:-1]
    return cut + tag


def _prefix(path: Path) -> str:
    return f".{_stem(path.name)}.{socket.gethostname()}-{os.getpid()}."


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_STOPS: dict[str, int] = {}


def _stop_point(event: str) -> None:
    """Kill tests' synchronisation hook (tests/reliability/test_atomic_kill.py); a no-op unless
    LDM_DEPLOY_STOP_AT="PATTERN[#N]" is set. The N-th event (default 1st) that matches PATTERN
    (fnmatch) stops the process with SIGSTOP, so the test can SIGKILL it at exactly that point.
    Events: "file:NAME" (a file is complete under its temporary name, not yet renamed) and
    "dir:NAME" (the previous folder was moved aside, the new one not yet renamed in)."""
    spec = os.environ.get("LDM_DEPLOY_STOP_AT")
    if not spec:
        return
    pattern, _, nth = spec.partition("#")
    if fnmatch.fnmatchcase(event, pattern):
        _STOPS[pattern] = _STOPS.get(pattern, 0) + 1
        if _STOPS[pattern] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGSTOP)


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
    pattern = re.compile(re.escape(f".{_stem(path.name)}.{socket.gethostname()}-") + r"(\d+)\..*\.(tmp|old)$")
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
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _stop_point(f"file:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=False)
        f.write("\n")


def json_format(path: str | os.PathLike) -> str | None:
    """The "format" of a JSON object file (None when it is not a readable JSON object with one)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj.get("format") if isinstance(obj, dict) and isinstance(obj.get("format"), str) else None


def check_out_file(path: str | os.PathLike, fmt: str, option: str = "--out") -> None:
    """Refuse (UsageError, nothing touched) to replace an existing `path` unless it is a JSON file we wrote
    with `"format": fmt` (an earlier run of the same command): never a user's own file, link or folder."""
    from ldm_deploy.errors import UsageError

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_file() and not path.is_symlink() and json_format(path) == fmt:
        return
    raise UsageError(f"{option} {path} already exists and is not a {fmt} file written by ldm-deploy; refusing to "
                     "replace it", hint=f"choose a new file name for {option}")


# ----------------------------------------------------------------------------- replacing a folder

MARKER = ".ldm-deploy.json"   # {"kind": ...}: written by atomic_dir into the folders it writes for a kind


@dataclass(frozen=True)
class OutputKind:
    """What a command writes at --out, and how to recognise a folder of that kind it may replace."""

    name: str                                  # marker kind: "model", "training-run", ...
    what: str                                  # for messages: "a model folder written by ldm-deploy"
    recognise: Callable[[Path], bool] | None = None  # a folder of this kind without the marker (older ones)
    marker: bool = True                        # atomic_dir writes MARKER into the new folder

    def owns(self, folder: Path) -> bool:
        if self.marker and has_marker(folder, self.name):
            return True
        return self.recognise is not None and self.recognise(folder)


def has_marker(folder: Path, kind: str) -> bool:
    p = folder / MARKER
    try:
        if p.is_symlink() or not p.is_file() or p.stat().st_size > 4096:
            return False
        return json.loads(p.read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(folder: Path, kind: str) -> None:
    write_json(folder / MARKER, {"kind": kind, "written_by": "ldm-deploy"})


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out.is_relative_to(inp):
        return "is inside"
    if inp.is_relative_to(out):
        return "holds"
    return None


def check_out_dir(out: str | os.PathLike, kind: OutputKind, *, inputs: Iterable = (), force: bool = False,
                  allow_inside: Iterable = ()) -> Path:
    """Refuse (UsageError, nothing touched) to write the folder `out` where that would destroy files
    that are not ours; return the real folder to write (a symbolic link is written through).

    - `out` that is, lies inside or holds one of `inputs` (files or folders the command reads) is
      refused even with `force` (`allow_inside`: real paths inside an input that are allowed, such as
      an artifact's own engines/ folder);
    - an existing `out` that is not a folder is refused;
    - an existing non-empty folder that `kind` does not recognise as its own is refused unless `force`.
    """
    from ldm_deploy.errors import UsageError

    given = Path(out)
    real = given.resolve()
    allowed = {Path(a).resolve() for a in allow_inside}
    for inp in inputs:
        if inp is None:
            continue
        inp_real = Path(inp).resolve()
        rel = _relation(real, inp_real)
        if rel is not None and not (rel == "is inside" and real in allowed):
            shown = f"{given} (-> {real})" if given.is_symlink() else str(given)
            raise UsageError(f"--out {shown} {rel} the input {inp}; writing it would destroy what is being read",
                             hint="choose an --out outside the inputs (--force does not apply)")
    if not real.exists():
        return real
    if not real.is_dir():
        raise UsageError(f"--out {given} exists and is not a folder", hint="choose a folder name for --out")
    if force or kind.owns(real) or not any(real.iterdir()):
        return real
    raise UsageError(f"--out {given} already exists and is not {kind.what}; refusing to replace it",
                     hint="choose another --out, or pass --force to replace that folder and everything in it")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: OutputKind | None = None, *, force: bool = False,
               inputs: Iterable = (), allow_inside: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    If `path` exists it is moved aside first and deleted only after the new one is in place,
    so a crash leaves either the old directory or the new one (plus a stray temporary).
    With `kind`, `check_out_dir` guards the replacement first and the new folder gets the kind's
    marker. A symbolic link `path` is written through: the folder it points to is replaced.
    """
    path = Path(path)
    if kind is not None:
        path = check_out_dir(path, kind, inputs=inputs, force=force, allow_inside=allow_inside)
    elif path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if kind is not None and kind.marker:
            write_marker(tmp, kind.name)
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            _stop_point(f"dir:{path.name}")
        os.replace(tmp, path)
        if old is not None:
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
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
