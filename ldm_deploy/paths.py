"""Paths read from files stay inside the folder the user named.

Every relative path that a manifest, an engine sidecar, model_index.json, a sharded weight index or a
tokenizer config names is turned into a real path by `inside(folder, rel, named_in=...)`: absolute
paths and `..` are refused, and the path is resolved (symbolic links followed) and must still lie in
`folder` (resolved too), so a link pointing out of the folder is refused with one line naming the
link and its target. A link that stays inside the folder is fine. `check_tree(folder)` applies the
same rule to every entry under a folder (a tokenizer folder, a whole artifact), without following
links while walking.

    path = inside(model_dir / "unet", index["weight_map"][key], named_in=index_file)   # a sharded weight index
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ldm_deploy.errors import LdmError


def _link_target(path: Path, root: Path) -> tuple[Path, Path] | None:
    """(link, its target) for the first symbolic link on the way from `root` to `path`, or None."""
    p = root
    for part in path.relative_to(root).parts:
        p = p / part
        if p.is_symlink():
            return p, Path(os.readlink(p))
    return None


def inside(folder: str | os.PathLike, rel: str, *, named_in: str | os.PathLike | None = None,
           hint: str = "re-create the folder with ldm-deploy; never point its files outside it") -> Path:
    """`folder/rel`, checked to lie inside `folder` once every symbolic link is resolved.

    `named_in` is the file `rel` was read from (for the error message). Raises LdmError (one line naming
    the file and, for a link, the link and its target) for an absolute path, `..`, a NUL byte, or a link
    that leads out of `folder`. The result need not exist.
    """
    root = Path(folder)
    where = f"{named_in} names" if named_in is not None else f"{root} holds"
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise LdmError(f"{where} the path {str(rel)[:80]!r}, which is not a relative path inside {root}", hint=hint)
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise LdmError(f"{where} the path {rel[:80]!r}, which is not inside {root}", hint=hint)
    path = root / p
    real_root = root.resolve()
    real = path.resolve()
    if not real.is_relative_to(real_root):
        link = _link_target(path, root)
        if link is not None:
            raise LdmError(f"{link[0]} is a symbolic link to {link[1]}, outside {root}"
                           + (f" (named in {named_in})" if named_in is not None else ""),
                           hint="copy the file into the folder instead of linking it")
        raise LdmError(f"{where} the path {rel[:80]!r}, which resolves to {real}, outside {root}", hint=hint)
    return path


def inside_file(folder: str | os.PathLike, rel: str, **kw) -> Path:
    """`inside(...)` that must also be a regular file (not a FIFO, device or socket) if it exists."""
    path = inside(folder, rel, **kw)
    try:
        mode = path.stat().st_mode
    except OSError:
        return path              # missing: the caller says so in its own words
    if not stat.S_ISREG(mode):
        raise LdmError(f"{path} is not a regular file", hint="replace it with the file it should be")
    return path


def check_tree(folder: str | os.PathLike, *, root: str | os.PathLike | None = None) -> None:
    """Every entry under `folder` (itself included) stays inside `root` (default `folder`): a symbolic
    link leading out of it, or a FIFO / device / socket, is refused. Links are not followed while walking."""
    folder = Path(folder)
    root = Path(root) if root is not None else folder
    if folder != root:
        inside(root, os.path.relpath(folder, root))
    for dirpath, dirnames, filenames in os.walk(folder):  # followlinks=False: a linked folder is checked, not walked
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.path.relpath(path, root)
            checked = inside(root, rel)
            if not path.is_symlink() and not (path.is_dir() or path.is_file()):
                raise LdmError(f"{checked} is not a regular file or folder", hint="remove it")
