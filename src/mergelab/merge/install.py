"""Putting a finished merge in place without ever replacing something the user did not ask to replace.

``--overwrite`` replaces OUT, and only OUT: it is refused when OUT is, or contains, an input checkpoint,
an input or base model folder, the tokenizer source, the config file or its folder, or the working
directory (``-o . --overwrite`` would empty it). Paths are compared resolved, so a symlink or ``..``
spelling of OUT does not get around it.

OUT that is a symbolic link is replaced as a link: the link becomes the merged folder and the folder it
pointed to is left as it was (a warning says so); nothing of the old OUT is left behind under a hidden name.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

from mergelab.errors import OutputError, OutputExistsError


def exists(path: Path) -> bool:
    """Whether anything is at ``path``, a dangling symbolic link included (``Path.exists`` follows links)."""
    return path.is_symlink() or path.exists()


def check_replaces_nothing_owned(out: Path, protected: Iterable[tuple[str, Path]]) -> None:
    """Refuse ``out`` when replacing it would replace or delete one of ``protected`` ((what, path) pairs)."""
    target = out.resolve()
    hits = []
    for what, path in protected:
        try:
            resolved = path.resolve()
        except OSError:
            continue
        if resolved == target or resolved.is_relative_to(target):
            hits.append(f"{what} {path}")
    if hits:
        shown = "; ".join(dict.fromkeys(hits[:3]))
        raise OutputError(f"{out}: is or holds {shown}; writing the merge there would replace "
                          f"{'it' if len(hits) == 1 else 'them'}. Choose another output folder with -o")


def install(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temporary folder into place; with ``overwrite``, swap out the old one last."""
    old = None
    link_target = None
    if exists(out_dir):
        if not overwrite:
            raise OutputExistsError(f"{out_dir} exists; pass --overwrite to replace it")
        if out_dir.is_symlink():
            link_target = os.readlink(out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)  # a link is renamed as a link: its target is not touched
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)  # put the previous OUT back
        raise
    if old is None:
        return
    if old.is_symlink() or not old.is_dir():
        old.unlink(missing_ok=True)
    else:
        failed: list[str] = []
        shutil.rmtree(old, onerror=lambda fn, path, info: failed.append(f"{path} ({info[1]})"))  # 3.11: no onexc
        if failed:
            warnings.warn(f"the merge is in {out_dir}, but the previous {out_dir} could not be fully removed: "
                          f"{failed[0]}; it is left in {old}, delete it yourself", stacklevel=2)
    if link_target is not None:
        warnings.warn(f"{out_dir} was a symbolic link to {link_target}: the link was replaced by the merged "
                      f"folder, and {link_target} was left as it was", stacklevel=2)
