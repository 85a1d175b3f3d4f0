"""A toy merge-search problem with a known optimum: per-block task-vector weights that rebuild a target."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

#: the per-block weights of the two task vectors that rebuild the target exactly
OPTIMUM = {"layers.0.": (0.8, 0.2), "layers.1.": (0.1, 0.9), "head.": (0.5, 0.5)}


def make_problem(root: Path, *, seed: int = 0) -> Path:
    """Base, two fine-tunes and a target as safetensors; returns the search config's path."""
    gen = torch.Generator().manual_seed(seed)
    names = {"layers.0.weight": (6, 5), "layers.0.bias": (6,), "layers.1.weight": (4, 6), "head.weight": (3, 4),
             "head.counter": ()}
    base, a, b, target = {}, {}, {}, {}
    for name, shape in names.items():
        if name == "head.counter":  # an integer buffer: passed through, never searched
            for sd in (base, a, b, target):
                sd[name] = torch.tensor(7)
            continue
        base[name] = torch.randn(shape, generator=gen)
        a[name] = base[name] + torch.randn(shape, generator=gen)
        b[name] = base[name] + torch.randn(shape, generator=gen)
        block = name.split(".")[0] + "." + (name.split(".")[1] + "." if name.startswith("layers") else "")
        wa, wb = OPTIMUM[block]
        target[name] = base[name] + wa * (a[name] - base[name]) + wb * (b[name] - base[name])
    root.mkdir(parents=True, exist_ok=True)
    for label, sd in (("base", base), ("a", a), ("b", b), ("target", target)):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{label}.safetensors"))
    config = {
        "merge": {"merge_method": "task_arithmetic", "base_model": "base.safetensors",
                  "models": [{"model": "a.safetensors", "parameters": {"weight": 0.5}},
                             {"model": "b.safetensors", "parameters": {"weight": 0.5}}]},
        "search": {"groups": "blocks", "parameters": [{"name": "weight", "low": 0.0, "high": 1.0}],
                   "population": 8, "generations": 6, "sigma0": 0.3, "seed": 0},
        "evaluator": {"callable": "search_toy:score", "kwargs": {"target": str(root / "target.safetensors")}},
    }
    path = root / "search.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def score(state_dict: dict[str, torch.Tensor], target: str) -> dict[str, float]:
    """Negative mean squared distance to the target (0 is perfect), plus the per-tensor errors."""
    ref = load_file(target)
    errs = {k: float(((state_dict[k].double() - v.double()) ** 2).mean()) for k, v in ref.items()
            if v.is_floating_point()}
    return {"score": -sum(errs.values()) / len(errs), **{f"mse[{k}]": e for k, e in errs.items()}}
