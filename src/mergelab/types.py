"""Types shared by every layer (no imports beyond torch, so the lowest layers can use them)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: a model's parameters and buffers by name, as ``nn.Module.state_dict()`` returns them (read-only use)
StateDict = Mapping[str, torch.Tensor]
