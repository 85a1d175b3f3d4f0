from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tiny_models import make_family


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # merges remember input digests (io/file_hashes.py): in the session's temp folder, not the user's home
    os.environ["MERGELAB_HASH_CACHE"] = str(tmp_path_factory.mktemp("sha256-cache"))


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Tiny Llama-, Mistral-, Qwen2-, GPT-2- and BERT-style families (base + 3 fine-tunes), saved once per
    session."""
    root = tmp_path_factory.mktemp("families")
    # Mistral and Qwen2 get their own seeds: with Llama's they would hold the same numbers as the Llama family
    seeds = {"mistral": 1, "qwen2": 2}
    return {arch: make_family(root, arch, seed=seeds.get(arch, 0))
            for arch in ("llama", "mistral", "qwen2", "gpt2", "bert")}


@pytest.fixture(scope="session")
def sharded_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("sharded"), "llama", max_shard_size="20KB", seed=3)
