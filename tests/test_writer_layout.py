"""The writer lays out every shard as the safetensors library does: each tensor aligned to its element size.

Every dtype the writer can write, in shuffled orders and across shard boundaries, is written and read back
with ``safe_open`` (values and dtypes equal), and every tensor's data starts at a file offset that is a
multiple of its element size, so a memory-mapped reader can view it in place.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.io.readers import TensorMeta, open_checkpoint
from mergelab.io.safetensors_file import SAFETENSORS_DTYPES
from mergelab.io.writer import ShardPlan, StreamingSafetensorsWriter, write_state_dict


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.rand(shape, generator=g) + 0.5).to(dtype)  # positive: representable in F8_E8M0 too
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def _layout(file: Path) -> tuple[int, dict[str, dict]]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, header


@pytest.mark.parametrize("seed", range(4))
def test_every_dtype_round_trips_through_safe_open_aligned(tmp_path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    dtypes = list(SAFETENSORS_DTYPES.values()) * 2
    rng.shuffle(dtypes)
    shapes = [(), (1,), (3,), (5, 3), (0, 4), (7,)]
    tensors = {f"t{i}.{str(d).removeprefix('torch.')}": _tensor(d, rng.choice(shapes), g)
               for i, d in enumerate(dtypes)}
    files = write_state_dict(tmp_path / "out", list(tensors.items()), max_shard_size=rng.choice([64, 200, 2**30]))
    seen = {}
    for file in files:
        data_start, header = _layout(file)
        for name, info in header.items():
            itemsize = tensors[name].element_size()
            assert (data_start + info["data_offsets"][0]) % itemsize == 0, (name, info, data_start)
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen[name] = f.get_tensor(name)
    assert set(seen) == set(tensors)
    for name, tensor in tensors.items():
        assert seen[name].dtype == tensor.dtype and seen[name].shape == tensor.shape, name
        assert seen[name].view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)) if tensor.dim() else \
            seen[name].reshape(1).view(torch.uint8).equal(tensor.reshape(1).view(torch.uint8)), name
    with open_checkpoint(tmp_path / "out") as reader:  # and our own reader agrees
        for name, tensor in tensors.items():
            assert reader.get(name).reshape(-1).view(torch.uint8).equal(tensor.reshape(-1).view(torch.uint8)), name


def test_layout_is_the_librarys_order(tmp_path: Path) -> None:
    """Largest dtype first, then by name: the same offsets as safetensors' own save_file."""
    g = torch.Generator().manual_seed(0)
    tensors = {"b16": _tensor(torch.float16, (3,), g), "a8": _tensor(torch.uint8, (5,), g),
               "z64": _tensor(torch.float64, (2,), g), "c32": _tensor(torch.float32, (3,), g),
               "a32": _tensor(torch.int32, (1,), g), "f32": _tensor(torch.float32, (2,), g)}
    ours = write_state_dict(tmp_path / "ours", list(tensors.items()))[0]
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    _, mine = _layout(ours)
    _, theirs = _layout(tmp_path / "theirs.safetensors")
    assert {k: v["data_offsets"] for k, v in mine.items()} == {k: v["data_offsets"] for k, v in theirs.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensors_written_in_any_order_make_the_same_files(tmp_path: Path, seed: int) -> None:
    # the engine merges the largest top-k tensors last (merge/engine.py, _passes_first): each tensor goes to its
    # planned place, so the shards, their headers and the index are those of a write in the plan's order
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i:02d}": torch.randn(int(torch.randint(1, 40, (1,), generator=g)), generator=g)
               for i in range(12)}
    metas = {n: TensorMeta(tuple(t.shape), t.dtype) for n, t in tensors.items()}
    write_state_dict(tmp_path / "planned", tensors, max_shard_size=300)
    plan = ShardPlan.build(metas, 300)
    assert len(plan.shards) >= 3  # a shard left open while others are written, and reopened by no one
    order = list(tensors)
    random.Random(seed).shuffle(order)
    (tmp_path / "shuffled").mkdir()
    writer = StreamingSafetensorsWriter(tmp_path / "shuffled", plan, order=order)
    for name in order:
        flat = tensors[name].reshape(-1)
        for a in range(0, flat.numel(), 7):  # in parts, as streamed pieces are
            writer.write_part(name, flat[a:a + 7])
    files = writer.close()
    assert len(files) == len(plan.shards)
    for path in sorted((tmp_path / "planned").iterdir()):
        assert (tmp_path / "shuffled" / path.name).read_bytes() == path.read_bytes(), path.name

    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="every planned tensor once"):
        StreamingSafetensorsWriter(tmp_path / "bad", plan, order=order[1:])
    with pytest.raises(ValueError, match="every planned tensor once"):
        StreamingSafetensorsWriter(tmp_path / "bad", plan, order=[*order, order[0]])
    writer = StreamingSafetensorsWriter(tmp_path / "bad", plan, order=order)
    with pytest.raises(RuntimeError, match=f"out of order; expected '{order[0]}'"):
        writer.write(order[1], tensors[order[1]])
    writer.abort()
