"""torch's float32 uniform draws from a seeded CPU generator, made by a compiled Mersenne Twister: the coins of
DARE's and DELLA's random drops at a third of the CPU.

torch's CPU uniform kernel is serial (one generator, one lock): 2.7–2.9 ms per 1 Mi draws on one thread, so a
DARE-TIES merge of 3 × 0.5 GB spent 1.1 of its 3.7 CPU s drawing two models' coins (2026-12-04). The twister
tempered a block of its state at a time gives the same numbers in 0.9 ms (``_loops.mt_uniform_loop``). Used only
where it gives torch's bits: checked on first use in a process against ``torch.rand`` over draws that cross the
state's 624-word refills, and only for a generator that has not drawn yet (its state then follows from its seed).
"""

from __future__ import annotations

import numpy as np
import torch

from mergelab.kernels.dispatch import loops, verified


class MersenneDraws:
    """The draws of one seeded CPU generator, continued call after call as the generator's would be."""

    def __init__(self, seed: int) -> None:
        module = loops()
        if module is None:
            raise RuntimeError("the compiled loops are not loaded")
        self._module = module
        self._state = np.empty(module.MT_WORDS, np.uint32)
        self._position = np.full(1, module.MT_WORDS, np.int64)  # a fresh state twists before its first word
        module.mt_seed_loop(seed & 0xFFFFFFFF, self._state)  # torch seeds with the low 32 bits (any uint64 seed)

    def take(self, numel: int) -> torch.Tensor:
        """The next ``numel`` draws: ``torch.rand(numel, generator=g)`` for the generator this replaces."""
        out = np.empty(numel, np.float32)
        self._module.mt_uniform_loop(self._state, self._position, out)
        return torch.from_numpy(out)


def mersenne_draws(generator: torch.Generator) -> MersenneDraws | None:
    """The compiled draws of ``generator`` (which is then not advanced: draw from one or the other), or None
    where torch's kernel must draw: loops not loaded or not giving torch's numbers, a generator off the CPU or
    one that has drawn already."""
    if loops() is None or generator.device.type != "cpu" or not verified("mersenne twister draws", None, _check):
        return None
    seed = generator.initial_seed()
    if not torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state()):
        return None
    return MersenneDraws(seed)


def _check() -> bool:
    for seed in (0, 5, 2**32 - 1, 2**40 + 3, 2**64 - 1):
        generator, draws = torch.Generator().manual_seed(seed), MersenneDraws(seed)
        for numel in (1, 622, 625, 5_000, 70_001, 3):  # across refills, ending anywhere in the state
            if not torch.equal(draws.take(numel), torch.rand(numel, generator=generator)):
                return False
    return True
