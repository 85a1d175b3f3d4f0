"""Putting a finished merge in place without ever replacing something the user did not ask to replace.

``--overwrite`` replaces the output of an earlier merge, and only that: OUT must be a folder whose every file
is listed in its ``mergelab.json`` as written by mergelab (or an empty folder). A folder that holds anything
else (the user's notes beside an earlier merge, a model folder mergelab did not write, a file) is refused
before any work, naming what it holds, and checked again just before the swap; mergekit writes into OUT
and leaves such files, which are then mixed with a merge they do not belong to. ``--overwrite`` is also
refused when OUT is, or contains, an input checkpoint, an input or base model folder, the tokenizer source,
the config file or its folder, or the working directory (``-o . --overwrite`` would empty it). Paths are
compared resolved, so a symlink or ``..`` spelling of OUT does not get around it.

OUT that is a symbolic link is replaced as a link: the link becomes the merged folder and the folder it
pointed to is left as it was (a warning says so); nothing of the old OUT is left behind under a hidden name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergelab.errors import OutputError, OutputExistsError


def exists(path: Path) -> bool:
    """Whether anything is at ``path``, a dangling symbolic link included (``Path.exists`` follows links)."""
    return path.is_symlink() or path.exists()


RECORD_NAME = "mergelab.json"
# what the engine wrote by name before records listed their files (mergelab.json without "files")
_OLD_RECORD_NAMES = {RECORD_NAME, "mergelab_config.yml", "README.md", "config.json", "generation_config.json",
                     "model.safetensors.index.json"}
_SHARD_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
_NAMED = 3  # entries a refusal names; the walk stops after one more
_RECORD_MAX_BYTES = 64 << 20  # a larger record is not one mergelab wrote (3 × 0.5 GB TIES: 1.7 kB)


def written_files(folder: Path, *about_to_write: str) -> list[str]:
    """Every file under ``folder`` (POSIX paths relative to it) and ``about_to_write``: the list a record keeps
    so that a later ``--overwrite`` can tell the files a merge wrote from the user's."""
    return sorted({*(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()),
                   *about_to_write})


def _recorded_files(folder: Path) -> set[str] | None:
    """The files ``folder``'s ``mergelab.json`` says mergelab wrote; None when it has no readable record."""
    try:
        if (folder / RECORD_NAME).stat().st_size > _RECORD_MAX_BYTES:
            return None
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    files = record.get("files")
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    copied = record.get("copied_files")
    if "mergelab_version" not in record or not isinstance(copied, list):
        return None
    shards = {p.name for p in folder.iterdir() if _SHARD_NAME.match(p.name)}
    return _OLD_RECORD_NAMES | shards | {f for f in copied if isinstance(f, str)}


def _entries(folder: Path) -> Iterator[str]:
    """Every file, link and empty folder under ``folder``, as POSIX paths relative to it (links not followed),
    and every folder that could not be listed (what it holds is unknown, so it counts as the user's)."""
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=unreadable.append):
        rel = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        for name in sorted(files + links):
            yield (rel / name).as_posix()
        if not dirs and not files and rel != Path("."):
            yield rel.as_posix() + "/"
        dirs.sort()
        yield from _unlisted(unreadable, folder)
    yield from _unlisted(unreadable, folder)


def _unlisted(errors: list[OSError], folder: Path) -> Iterator[str]:
    while errors:
        yield Path(str(errors.pop().filename)).relative_to(folder).as_posix() + "/"


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` unless nothing is there or, with ``overwrite``, it holds an earlier merge and nothing else.

    A symbolic link is replaced as a link (its target is left as it was, see :func:`install`)."""
    if not exists(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.is_symlink():
        return
    if not out.is_dir():
        raise OutputError(f"{out} is a file, not the output folder of an earlier merge; --overwrite replaces "
                          "only a folder a merge wrote. Move or delete it yourself, or choose another -o")
    recorded = _recorded_files(out)
    others: list[str] = []
    for entry in _entries(out):
        if recorded is None or entry not in recorded:
            others.append(entry)
            if len(others) > _NAMED:
                break
    if not others:
        return
    shown = ", ".join(others[:_NAMED]) + (", ..." if len(others) > _NAMED else "")
    what = ("is not the output of a merge (it has no mergelab.json listing the files mergelab wrote) and holds"
            if recorded is None else "holds files no merge wrote there:")
    raise OutputError(f"{out} {what} {shown}; --overwrite replaces an earlier merge's folder and never deletes "
                      f"files mergelab did not write. Move them out of {out} (or delete them yourself), or choose "
                      "another -o")


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
    """Move the finished temporary folder into place; with ``overwrite``, swap out the old one last.

    OUT is checked again here (:func:`check_replaceable`): the merge may have run for an hour, and the user
    may have put a file into the old OUT meanwhile."""
    old = None
    link_target = None
    check_replaceable(out_dir, overwrite)
    if exists(out_dir):
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
