"""Checkpoint readers and the streaming, atomic safetensors writer. No merge method lives here.

The names below load on first use (PEP 562), so that the torch-free modules of this package
(``checkpoint_files``, ``file_hashes``) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"CheckpointReader": "readers", "TensorMeta": "readers", "open_checkpoint": "readers",
          "ShardPlan": "writer", "StreamingSafetensorsWriter": "writer", "parse_size": "writer"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"mergelab.io.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'mergelab.io' has no attribute {name!r}")
