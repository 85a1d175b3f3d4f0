"""Safetensors headers are accepted or refused exactly as the ``safetensors`` library refuses them.

The library (``safe_open``) is the oracle: hand-made cases for every rule, then hypothesis-made headers
(well-formed ones perturbed in offsets, shapes, dtypes, types, metadata, duplicates, trailing bytes). The
deliberate differences are asserted too: a repeated tensor name is refused here, the packed sub-byte dtypes
(F4, F6_*) are refused by name ("unsupported dtype"), and so is a dimension beyond 2^63 - 1 in an empty
tensor (the library accepts the header, then fails to make the tensor).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mergelab.errors import CheckpointError
from mergelab.io.safetensors_file import SafetensorsFile
from mergelab.io.safetensors_header import FORMAT_DTYPES

SUB_BYTE = {"F4", "F6_E2M3", "F6_E3M2"}


def _file(header: bytes, data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return Path(name)


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
        return True
    except Exception:  # SafetensorError, or whatever the Rust side raises for a crafted file
        return False


def _we_accept(path: Path) -> tuple[bool, str]:
    try:
        SafetensorsFile(path).close()
        return True, ""
    except CheckpointError as exc:
        return False, str(exc)


def _compare(header: bytes, data: bytes) -> None:
    path = _file(header, data)
    try:
        theirs = _library_accepts(path)
        ours, why = _we_accept(path)
    finally:
        path.unlink()
    text = header.decode("utf-8", "replace")
    if theirs and not ours and ("unsupported dtype" in why or "appears twice" in why or "torch can hold" in why):
        return  # the deliberate differences (see the module docstring)
    assert ours == theirs, f"library {'accepts' if theirs else 'refuses'}, we {'accept' if ours else 'refuse'}: " \
                           f"{text[:300]!r} + {len(data)} bytes ({why})"


def T(begin: int, end: int, shape: list[object] | None = None, dtype: object = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": [1] if shape is None else shape, "data_offsets": [begin, end]}


def J(obj: object) -> bytes:
    return json.dumps(obj).encode()


CASES: dict[str, tuple[bytes, bytes]] = {
    "valid": (J({"a": T(0, 4), "b": T(4, 8)}), b"\0" * 8),
    "offsets out of order in the JSON": (J({"b": T(4, 8), "a": T(0, 4)}), b"\0" * 8),
    "overlapping": (J({"a": T(0, 4), "b": T(0, 4)}), b"\0" * 4),
    "gap": (J({"a": T(0, 4), "b": T(8, 12)}), b"\0" * 12),
    "first tensor not at 0": (J({"a": T(4, 8)}), b"\0" * 8),
    "end before begin": (J({"a": T(4, 0)}), b"\0" * 4),
    "trailing bytes": (J({"a": T(0, 4)}), b"\0" * 5),
    "truncated data": (J({"a": T(0, 4)}), b"\0" * 3),
    "size not matching shape": (J({"a": T(0, 8)}), b"\0" * 8),
    "metadata value an integer": (J({"__metadata__": {"x": 1}, "a": T(0, 4)}), b"\0" * 4),
    "metadata null": (J({"__metadata__": None, "a": T(0, 4)}), b"\0" * 4),
    "metadata a list": (J({"__metadata__": [], "a": T(0, 4)}), b"\0" * 4),
    "metadata value null": (J({"__metadata__": {"x": None}, "a": T(0, 4)}), b"\0" * 4),
    "metadata twice": (b'{"__metadata__":{},"__metadata__":{},"a":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "metadata key twice": (b'{"__metadata__":{"x":"1","x":"2"},"a":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "negative dimension": (J({"a": T(0, 4, [-1])}), b"\0" * 4),
    "float dimension": (J({"a": T(0, 4, [1.0])}), b"\0" * 4),
    "string dimension": (J({"a": T(0, 4, ["1"])}), b"\0" * 4),
    "bool dimension": (J({"a": T(0, 4, [True])}), b"\0" * 4),
    "-0 dimension": (b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b""),
    "dimension over 2^64": (J({"a": T(0, 0, [2**64, 0])}), b""),
    "dimension 2^64 - 1 with a zero": (J({"a": T(0, 0, [2**64 - 1, 0])}), b""),
    "element count overflows": (J({"a": T(0, 4, [2**32, 2**32, 2**10])}), b"\0" * 4),
    "overflow before a zero dimension": (J({"a": T(0, 0, [2**62, 8, 0])}), b""),
    "bit count overflows": (J({"a": T(0, 0, [2**61], "F64")}), b""),
    "scalar": (J({"a": T(0, 4, [])}), b"\0" * 4),
    "empty tensor": (J({"a": T(0, 0, [0, 3])}), b""),
    "no tensors": (J({}), b""),
    "unknown field ignored": (J({"a": {**T(0, 4), "extra": [1, {"x": None}]}}), b"\0" * 4),
    "missing field": (J({"a": {"dtype": "F32", "shape": [1]}}), b"\0" * 4),
    "three offsets": (J({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}), b"\0" * 4),
    "negative offset": (J({"a": T(-4, 0, [0])}), b""),
    "float offset": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}', b"\0" * 4),
    "leading whitespace": (b' \n{"a":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "trailing spaces (the library's own padding)": (J({"a": T(0, 4)}) + b"    ", b"\0" * 4),
    "trailing NUL": (J({"a": T(0, 4)}) + b"\0", b"\0" * 4),
    "trailing form feed": (J({"a": T(0, 4)}) + b"\x0c", b"\0" * 4),
    "byte order mark": ("\ufeff".encode() + J({"a": T(0, 4)}), b"\0" * 4),
    "NaN literal": (b'{"__metadata__":{"x":NaN},"a":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "lone surrogate escape": (b'{"a\\ud800":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "surrogate pair escape": (b'{"a\\ud83d\\ude00":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "raw control character": (b'{"a\x01":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "not UTF-8": (b'{"a\xff":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "tensor entry an array of 3": (b'{"a":["F32",[1],[0,4]]}', b"\0" * 4),
    "tensor entry an array of 4": (b'{"a":["F32",[1],[0,4],1]}', b"\0" * 4),
    "tensor entry a number": (J({"a": 1}), b""),
    "dtype as a one-key map": (b'{"a":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "dtype as a map with a value": (b'{"a":{"dtype":{"F32":1},"shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "dtype unknown": (J({"a": T(0, 4, [1], "X99")}), b"\0" * 4),
    "dtype lower case": (J({"a": T(0, 4, [1], "f32")}), b"\0" * 4),
    "field twice": (b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4),
    "header is an array": (b"[]", b""),
    "header empty": (b"", b""),
    "escaped __metadata__ key": (b'{"__metad\\u0061ta__":{"x":"y"},"a":' + J(T(0, 4)) + b"}", b"\0" * 4),
    "nesting 127 deep": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 125 + b"]" * 125
                         + b"}}", b""),
    "nesting 128 deep": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 126 + b"]" * 126
                         + b"}}", b""),
    "nesting 5000 deep": (b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":' + b"[" * 5000
                          + b"]" * 5000 + b"}}", b""),
    "number out of range in an ignored field": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1e400}}',
                                                b"\0" * 4),
    **{f"dtype {d}": (J({"a": T(0, 16 * b // 8, [16], d)}), b"\0" * (16 * b // 8)) for d, b in FORMAT_DTYPES.items()},
    "F4 not ending on a byte": (J({"a": T(0, 2, [3], "F4")}), b"\0" * 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_header_accepted_exactly_when_the_library_accepts_it(case: str) -> None:
    _compare(*CASES[case])


@pytest.mark.parametrize("dtype", sorted(SUB_BYTE))
def test_sub_byte_dtypes_are_refused_as_unsupported(dtype: str) -> None:
    nbytes = 16 * FORMAT_DTYPES[dtype] // 8
    path = _file(J({"a": T(0, nbytes, [16], dtype)}), b"\0" * nbytes)
    with pytest.raises(CheckpointError, match=f"unsupported dtype {dtype}"):
        SafetensorsFile(path)


def test_repeated_tensor_name_is_refused_even_where_the_library_keeps_the_last() -> None:
    path = _file(b'{"a":' + J(T(0, 4)) + b',"a":' + J(T(0, 4)) + b"}", b"\0" * 4)
    assert _library_accepts(path)
    with pytest.raises(CheckpointError, match="tensor 'a' appears twice"):
        SafetensorsFile(path)


def test_refusal_names_the_file_and_the_rule() -> None:
    path = _file(J({"a": T(0, 4), "b": T(8, 12)}), b"\0" * 12)
    with pytest.raises(CheckpointError, match=rf"{path}: not a valid safetensors file: tensor 'b' .*without gaps"):
        SafetensorsFile(path)


# -- generated headers ---------------------------------------------------------------------------------------
names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=4)
dims = st.one_of(st.integers(0, 5), st.sampled_from([-1, 2**63, 2**64, 2**64 - 1, 2**32]), st.floats(0, 3),
                 st.booleans(), st.just("2"))


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Mostly consistent headers, each with a chance of one or more perturbations."""
    entries: dict[str, object] = {}
    offset = 0
    for name in draw(st.lists(names, max_size=4, unique=True)):
        dtype = draw(st.sampled_from([*FORMAT_DTYPES, "X8"]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        count = 1
        for d in shape:
            count *= d
        nbytes = count * FORMAT_DTYPES.get(dtype, 8) // 8
        begin, end = offset, offset + nbytes
        offset = end
        if draw(st.integers(0, 9)) == 0:
            shape = draw(st.lists(dims, max_size=3))
        if draw(st.integers(0, 9)) == 0:
            begin, end = draw(st.tuples(st.integers(-2, 40), st.integers(-2, 40)))
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    if draw(st.booleans()):
        entries["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(names, st.one_of(names, st.integers()),
                                                                           max_size=2)))
    items = list(entries.items())
    if items and draw(st.integers(0, 9)) == 0:
        items.append(draw(st.sampled_from(items)))  # a repeated key
    raw = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in draw(st.permutations(items))) + "}"
    raw += draw(st.sampled_from(["", "  ", "\n", "x", "\0"]))
    data_len = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
    return raw.encode(), b"\0" * max(0, data_len)


@settings(max_examples=int(os.environ.get("MERGELAB_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=headers())
def test_generated_headers_accepted_exactly_when_the_library_accepts_them(case: tuple[bytes, bytes]) -> None:
    _compare(*case)
