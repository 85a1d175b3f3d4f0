"""YAML for configs, with the limits a file from anyone needs.

``yaml.safe_load`` constructs no Python objects beyond plain data, but it still (1) keeps the last of two
equal keys silently, so a typo'd duplicate wins without a word; (2) builds alias-expansion "bombs" (nine
anchors of nine aliases each: a billion leaves) as a small shared graph that every later walk (pydantic,
the record writer) expands exponentially; (3) recurses once per nesting level, so a few thousand ``[`` end in
a RecursionError. Here a repeated key is an error naming it, and the loaded value is walked once with a
budget of nodes (aliases expanded) and of depth, before anything else sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergelab.errors import ConfigError

MAX_BYTES = 10 * 2**20  # a merge config is a few kB; a larger file is a mistake or an attack
MAX_NODES = 200_000  # values after alias expansion: ~100× a config with a thousand model entries
MAX_DEPTH = 64  # the deepest real config (conditionals in a model's parameters) nests about 6 levels


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first.line + 1} and "
                         f"{second.line + 1}); YAML would keep only the last. Remove one of them")


class _TooDeep(yaml.YAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # checked while composing, not after: the composer recurses per level, and failing only at Python's
        # recursion limit took 4.5 s for 5,000 nested '['
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep()
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *defaults': explicit keys may override those
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            if first is not None:
                raise _DuplicateKey(key, first, key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_config_text(path: Path, what: str = "config") -> str:
    """The text of the config file ``path``, read only when it is a regular file of at most :data:`MAX_BYTES`
    (a pipe can be read once, ``/dev/zero`` never ends, and a 10 GB file would be read whole before its size
    was refused); otherwise, or when it cannot be read, a :class:`ConfigError`."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: is not a regular file (a pipe, such as <(...), or a device); write the "
                          f"{what} to a file and give its path")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{path}: {size} bytes, more than a {what} can need ({MAX_BYTES}); is this the "
                              "right file?")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, or not a text file
        raise ConfigError(f"{path}: cannot read the {what} file ({exc})") from None


def load_yaml(text: str, source: str) -> Any:
    """Parse ``text`` (from ``source``, named in errors) or raise :class:`ConfigError`."""
    return load_yaml_documents(text, source, single=True)[0]


def load_yaml_documents(text: str, source: str, *, single: bool = False) -> list[Any]:
    """Every document of ``text`` (``single``: exactly one, as :func:`load_yaml`), with :func:`load_yaml`'s
    limits and errors; empty documents are kept as None."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters, more than a config can need ({MAX_BYTES}); "
                          "is this the right file?")
    try:
        # a SafeLoader: plain data only
        values = [yaml.load(text, Loader=_StrictLoader)] if single else list(yaml.load_all(text, Loader=_StrictLoader))
    except _DuplicateKey as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except _TooDeep:
        raise ConfigError(f"{source}: nested too deeply to be a config (more than {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config (more than {MAX_DEPTH} levels)") from None
    for value in values:
        _check_size(value, source)
    return values


def _check_size(value: Any, source: str) -> None:
    """Walk ``value`` once, aliases expanded, stopping at the first node past the budgets."""
    budget = MAX_NODES
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(f"{source}: expands to more than {MAX_NODES} values (YAML anchors and aliases "
                              "repeated inside one another?); a config is far smaller")
        if isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}: nested too deeply to be a config (more than {MAX_DEPTH} levels)")
            children = [x for kv in item.items() for x in kv] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
