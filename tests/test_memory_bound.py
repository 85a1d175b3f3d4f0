"""A merge streams tensor by tensor (linear: piece by piece), so it runs with far less memory than the
models it merges: the proof is a merge under an address-space limit that loading the models would break.

RLIMIT_DATA bounds a process's heap and private anonymous mappings, where every tensor lives (the
safetensors reader reads with ``readinto`` into fresh tensors, not through a file mapping). The same limit
is shown to bite: loading the inputs whole fails under it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

resource = pytest.importorskip("resource")  # POSIX only

MiB = 2**20
TENSORS, ENTRIES = 12, 8 * MiB  # per model: 12 float32 tensors of 32 MiB = 384 MiB; three models: 1,152 MiB
LIMIT = 512 * MiB  # of which Python with torch and mergelab imported takes about 300 (232 MiB resident)

_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))
{body}
"""
_MERGE = """
from mergelab.merge.engine import run_merge
run_merge(sys.argv[1], sys.argv[2], progress=False)
print("merged")
"""
_LOAD_ALL = """
from pathlib import Path
models = [Path(p).read_bytes() for p in sys.argv[1:]]  # the inputs' bytes, held at once
print("loaded")
"""


def _models(root: Path) -> list[Path]:
    folders = []
    for m in range(3):
        folder = root / f"m{m}"
        folder.mkdir()
        phase = torch.arange(ENTRIES, dtype=torch.float32).mul_(1e-4)
        tensors = {f"layer.{i}.weight": phase.add(i + 0.1 * m).sin_() for i in range(TENSORS)}
        save_file(tensors, str(folder / "model.safetensors"))
        del tensors
        folders.append(folder)
    return folders


def _run(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    return subprocess.run([sys.executable, "-c", _UNDER_LIMIT.format(limit=LIMIT, body=body), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_task_arithmetic_of_three_models_twice_its_memory_limit(tmp_path: Path) -> None:
    base, a, b = _models(tmp_path)
    model_bytes = sum(f.stat().st_size for p in (base, a, b) for f in p.glob("*.safetensors"))
    assert model_bytes > 2 * LIMIT
    loaded = _run(_LOAD_ALL, *(str(p / "model.safetensors") for p in (base, a, b)))
    # the limit bites whole-model loading
    assert loaded.returncode != 0 and "loaded" not in loaded.stdout and "MemoryError" in loaded.stderr, loaded.stderr
    config = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in (a, b)]}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    merged = _run(_MERGE, str(tmp_path / "merge.yml"), str(tmp_path / "out"))
    assert merged.returncode == 0 and "merged" in merged.stdout, merged.stderr[-3000:]
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(f"layer.{i}.weight" for i in range(TENSORS))
    name = "layer.7.weight"
    theirs = [load_file(str(p / "model.safetensors"))[name] for p in (base, a, b)]
    expected = theirs[0] + 0.5 * (theirs[1] - theirs[0]) + 0.5 * (theirs[2] - theirs[0])
    assert torch.allclose(out[name], expected, atol=1e-6)
