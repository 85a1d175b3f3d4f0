"""Parse and validate a safetensors header exactly as the ``safetensors`` library (0.8, Rust) does.

The library deserialises the header with serde_json into ``{"__metadata__": {str: str} | null,
name: {dtype, shape, data_offsets}}`` and then checks the layout; every file it refuses, we refuse, and
(with one deliberate exception) every file it accepts, we accept. What that means, rule by rule (each was
checked against ``safe_open`` in tests/test_safetensors_header.py):

- 8-byte little-endian header length ``n`` ≤ 100,000,000 and ``8 + n`` ≤ file size; the header is UTF-8
  JSON (serde's grammar: no NaN/Infinity, no lone surrogate escapes, no trailing characters but spaces,
  tabs and newlines, at most 127 levels of nesting; ``-0`` and integers beyond 2⁶⁴ are floats);
- ``__metadata__`` is null or a map of strings to strings (a repeated key keeps the last; a repeated
  ``__metadata__`` is an error);
- a tensor entry is a map with ``dtype``, ``shape``, ``data_offsets`` (other fields ignored, a repeated
  field an error) or the 3-element sequence of those; ``dtype`` one of :data:`FORMAT_DTYPES` (or serde's
  ``{"F32": null}`` spelling); shape entries and offsets unsigned 64-bit integers; exactly two offsets;
- sorted by offsets, the tensors tile the data area from 0 without gaps or overlaps, each exactly as long as
  its shape and dtype need (element counts computed with overflow checks, in shape order), sub-byte dtypes
  ending on a byte boundary, and the last one ends exactly at the end of the file (no trailing bytes).

The exception: a tensor name that appears twice is an error here, even where the library silently keeps
the last entry (both entries then describe the same bytes, or the first one's bytes would be a gap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMAT_DTYPES: dict[str, int] = {  # every dtype of the format, with its size in bits
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER = 100_000_000  # the library's MAX_HEADER_SIZE
MAX_DEPTH = 127  # serde_json's recursion limit (128) counts the value being opened
_USIZE = 2**64
_FIELDS = ("dtype", "shape", "data_offsets")


class HeaderError(ValueError):
    """The header breaks one of the format's rules; the message says which (and names the tensor)."""


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as its (key, value) pairs in file order, so repeated keys stay visible."""


def header_length(prefix: bytes, file_size: int) -> int:
    """The header length from the file's first 8 bytes, checked against the file size."""
    if file_size < 8:
        raise HeaderError(f"only {file_size} bytes long; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER:
        raise HeaderError(f"header length {n} is over the format's limit of {MAX_HEADER} bytes")
    if 8 + n > file_size:
        raise HeaderError(f"header length {n} does not fit in the file's {file_size} bytes")
    return n


def parse_header(raw: bytes, file_size: int) -> tuple[dict[str, HeaderEntry], dict[str, str] | None]:
    """(tensors by name, metadata) of a header ``raw`` (the ``n`` bytes after the length) of a file of
    ``file_size`` bytes; raises :class:`HeaderError` for anything the library would refuse."""
    value = _load_json(raw)
    if not isinstance(value, _Pairs):
        raise HeaderError(f"the header is JSON {_kind(value)}, not an object")
    metadata: dict[str, str] | None = None
    seen_metadata = False
    entries: dict[str, HeaderEntry] = {}
    for name, info in value:
        if name == "__metadata__":
            if seen_metadata:
                raise HeaderError("'__metadata__' appears twice")
            seen_metadata = True
            metadata = _metadata(info)
            continue
        if name in entries:
            raise HeaderError(f"tensor '{name}' appears twice in the header")
        entries[name] = _entry(name, info)
    end = _check_layout(entries)
    if 8 + len(raw) + end != file_size:
        extra = file_size - (8 + len(raw) + end)
        what = f"{extra} trailing bytes after the last tensor" if extra > 0 else f"{-extra} bytes missing"
        raise HeaderError(f"the tensors' data does not cover the file exactly ({what}): the file is truncated "
                          "or has data appended")
    return entries, metadata


# -- JSON with serde_json's grammar ---------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise HeaderError(f"the header is not valid JSON ({name} is not a JSON number)")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise HeaderError(f"the header is not valid JSON (number {text} out of range)")
    return value


def _int(text: str) -> int | float:
    # serde_json reads "-0" as a float, and so it is not an unsigned integer (shape, offset)
    return -0.0 if text == "-0" else int(text)


def _load_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")  # strict: no BOM stripping, no surrogates (json.loads(bytes) allows both)
    except UnicodeDecodeError as exc:
        raise HeaderError(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant, parse_int=_int,
                           parse_float=_float)
    except json.JSONDecodeError as exc:
        raise HeaderError(f"the header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise HeaderError(f"the header nests deeper than {MAX_DEPTH} levels") from None
    _check_strings_and_depth(value)
    return value


def _check_strings_and_depth(value: Any) -> None:
    """serde_json refuses lone surrogate escapes ("\\ud800") and nesting beyond its recursion limit."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, _Pairs)):
            if depth > MAX_DEPTH:
                raise HeaderError(f"the header nests deeper than {MAX_DEPTH} levels")
            children = item if not isinstance(item, _Pairs) else [x for pair in item for x in pair]
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise HeaderError(f"the header has a string with a lone surrogate escape: {item!r}") from None


# -- the schema -----------------------------------------------------------------------------------------------
def _kind(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    return f"the string {value!r}"


def _metadata(info: Any) -> dict[str, str] | None:
    if info is None:
        return None
    if not isinstance(info, _Pairs):
        raise HeaderError(f"'__metadata__' must be an object of strings, got {_kind(info)}")
    out: dict[str, str] = {}
    for key, value in info:
        if not isinstance(value, str):
            raise HeaderError(f"'__metadata__' value of '{key}' must be a string, got {_kind(value)}")
        out[key] = value
    return out


def _usize(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _USIZE:
        raise HeaderError(f"{what} must be an unsigned 64-bit integer, got {_kind(value)}")
    return value


def _dtype(value: Any, where: str) -> str:
    if isinstance(value, _Pairs):  # serde's externally tagged spelling of a unit variant: {"F32": null}
        if len(value) != 1 or value[0][1] is not None:
            raise HeaderError(f"{where}: 'dtype' must be a dtype name, got {_kind(value)}")
        value = value[0][0]
    if not isinstance(value, str):
        raise HeaderError(f"{where}: 'dtype' must be a dtype name, got {_kind(value)}")
    if value not in FORMAT_DTYPES:
        raise HeaderError(f"{where}: unknown dtype '{value}'; the safetensors format defines "
                          f"{', '.join(FORMAT_DTYPES)}")
    return value


def _entry(name: str, info: Any) -> HeaderEntry:
    where = f"tensor '{name}'"
    if isinstance(info, _Pairs):
        fields: dict[str, Any] = {}
        for key, value in info:
            if key in _FIELDS:
                if key in fields:
                    raise HeaderError(f"{where}: field '{key}' appears twice")
                fields[key] = value
        missing = [f for f in _FIELDS if f not in fields]
        if missing:
            raise HeaderError(f"{where}: missing field '{missing[0]}'")
        dtype, shape, offsets = (fields[f] for f in _FIELDS)
    elif isinstance(info, list):
        if len(info) != 3:
            raise HeaderError(f"{where}: expected an object with dtype, shape and data_offsets, got an array of "
                              f"{len(info)} values")
        dtype, shape, offsets = info
    else:
        raise HeaderError(f"{where}: expected an object with dtype, shape and data_offsets, got {_kind(info)}")
    dtype = _dtype(dtype, where)
    if not isinstance(shape, list):
        raise HeaderError(f"{where}: 'shape' must be an array, got {_kind(shape)}")
    dims = tuple(_usize(d, f"{where}: each 'shape' entry") for d in shape)
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise HeaderError(f"{where}: 'data_offsets' must be two integers [begin, end], got {_kind(offsets)}"
                          + (f" of length {len(offsets)}" if isinstance(offsets, list) else ""))
    begin, end = (_usize(x, f"{where}: 'data_offsets'") for x in offsets)
    return HeaderEntry(dtype, dims, begin, end)


def _check_layout(entries: dict[str, HeaderEntry]) -> int:
    """The library's ``Metadata::validate``: returns where the data ends."""
    start = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != start or e.end < e.begin:
            raise HeaderError(f"tensor '{name}' has data_offsets [{e.begin}, {e.end}] but the previous tensor "
                              f"ends at {start}: tensors must follow one another without gaps or overlaps")
        start = e.end
        count = 1
        for d in e.shape:
            count *= d
            if count >= _USIZE:
                raise HeaderError(f"tensor '{name}': shape {list(e.shape)} overflows 64 bits")
        bits = count * FORMAT_DTYPES[e.dtype]
        if bits >= _USIZE:
            raise HeaderError(f"tensor '{name}': shape {list(e.shape)} of {e.dtype} overflows 64 bits")
        if bits % 8:
            raise HeaderError(f"tensor '{name}': {count} {e.dtype} values do not end on a byte boundary")
        if e.end - e.begin != bits // 8:
            raise HeaderError(f"tensor '{name}' claims {e.end - e.begin} bytes, but shape {list(e.shape)} of "
                              f"{e.dtype} needs {bits // 8}")
    return start
