"""Run a planned merge: stream tensors from every input, merge each with the method, write the result.

Memory: one large tensor name is in flight at a time (plus the next one being read ahead on a thread, unless
two of the largest tensors meet), so peak memory is about (models + 2) × the largest tensor plus the method's
work space; small pieces (a few MiB) are read ahead and merged two at a time on two threads beside it
(:func:`_merge_threads`, :func:`_fit_together`), which adds a few MiB; the next streamed tensor's whole-tensor
pass runs beside this one's pieces only where the two tensors together are no larger than the largest.
Element-wise methods (linear, task arithmetic) go further: large tensors are streamed in flat pieces of
``_PIECE_ENTRIES`` entries (read a range of every input, merge, write that range), so their peak does not grow
with the model at all. TIES (per-tensor scope, no rescale) streams too, after a first pass over each model's
task vector in pieces finds its exact top-k rule (:func:`_topk_rules`): what stays whole is one model's 2-byte
magnitude keys of the tensor, which the sort replay widens in place to 4 bytes per entry (its work space: no
array of positions, :mod:`~mergelab.merge.rank_workspace`), beside the pieces in flight. The passes of the
largest tensors (a language model's head and embedding) run first, on a thread of their own beside the merge of
the others, and their pieces merge last (:func:`_passes_first`): the writer puts every tensor in its place.
Breadcrumbs (no rescale) streams the same way, its rule two-sided: the band of ranks its one ascending sort
keeps (:func:`~mergelab.methods.sparsify.band_of_keys`). Methods with a scalar pass (SLERP: two norms and a
dot product; Model Stock: its task vectors' norms and pairwise dot products, summed in torch's order) stream
like the element-wise ones, after that pass has read the inputs in flat ranges (:func:`_flat_source`): nothing
of the tensor stays whole, except where its inputs are small (together at most ``_KEPT_BYTES``): those the
pass reads once, whole, and the pieces are cut from them instead of being read again (:class:`_KeptInputs`).
DARE (density rescale or none) streams the same way: its "scalar pass" reads nothing and makes each model's
random generator, which the pieces draw their masks from in order (the whole draw's numbers); so does DELLA,
in pieces of whole rows (its keep probabilities are ranked within rows: :func:`_piece_unit`). Shards are
written tensor by tensor (io.writer), never buffered. Safety: everything goes to a hidden temporary folder
beside OUT_DIR, renamed into place only when complete; on any error the temporary folder is removed and an
existing OUT_DIR is left untouched.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
import yaml
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mergelab.errors import CompatibilityError, ConfigError, OutputError, OutputExistsError, UsageError
from mergelab.io.file_hashes import DEFAULT_DIGEST, DIGESTS, DigestAlgorithm, digest_algorithm
from mergelab.io.hub import cached_lfs_oid
from mergelab.io.readers import CheckpointReader
from mergelab.io.writer import ShardPlan, StreamingSafetensorsWriter, parse_size
from mergelab.kernels.dispatch import warm_up_in_background
from mergelab.kernels.masked import KEY_SPECS
from mergelab.merge.allocator import MMAP_THRESHOLD
from mergelab.merge.config import MergeConfig, load_config
from mergelab.merge.core import FLOAT8_DTYPES, one_thread, prepared, vouched_merge_tensor, vouched_scalars
from mergelab.merge.extra_files import copy_extra_files, refuse_outside
from mergelab.merge.install import (
    RECORD_NAME,
    check_replaceable,
    check_replaces_nothing_owned,
    exists,
    written_files,
)
from mergelab.merge.install import install as _install
from mergelab.merge.model_card import library_name, render_model_card
from mergelab.merge.plan import MergePlan, count_nonfinite, nonfinite_message, plan_merge
from mergelab.merge.rank_workspace import RankWorkspace
from mergelab.merge.stages import read_stage_documents, run_stages
from mergelab.merge.thresholds import global_threshold
from mergelab.merge.tokenizer import write_tokenizer
from mergelab.methods.registry import FlatSource, PieceScalars
from mergelab.methods.sparsify import TopK
from mergelab.methods.task_vectors import arithmetic_dtype, checked_task_vector_keys, task_vector
from mergelab.runtime import available_cores, make_progress

COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "spiece.model", "sentencepiece.bpe.model",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
_HEADROOM = 1 << 20  # headers, index, config and record files written beside the tensors
# Entries per streamed piece of an element-wise merge (2 MiB of bf16, 4 MiB in float32): small enough to stay
# in cache between the conversion and the sums (a weighted sum of three bf16 inputs ran 3× slower in pieces
# of 4 Mi entries, 6× in pieces of 16 Mi), large enough that per-piece Python overhead stays small.
_PIECE_ENTRIES = 1 << 20
# Pieces up to this size (a float32 piece of _PIECE_ENTRIES) may merge side by side on the merge threads.
_SIDE_BY_SIDE_BYTES = _PIECE_ENTRIES * 4
_MERGE_THREADS = 2
# A merge of a method with compiled loops loads them first, on a thread of their own, when its inputs reach
# this size: loading costs ~0.5 CPU s, and the loops save ~0.45 CPU s per GB of input against eager torch
# (linear, 3 bfloat16 inputs, 2026-12-02: benchmarks/compiled_loops.py).
_WARM_UP_BYTES = 1 << 30
# A streamed tensor whose inputs together are at most this many bytes, none above the allocator's mmap
# threshold (a fresh mapping is faulted in page by page: merge/allocator.py), is read once, whole, by its
# whole-tensor pass, and its pieces are cut from what the pass read (:class:`_KeptInputs`).
_KEPT_BYTES = 96 << 20
# How many streamed tensors ahead of the pieces a scalar pass may run (a top-k pass: one, its keys and sort work
# space being as large as the tensor). A scalar pass holds at most the kept inputs; with one, a large tensor's
# pass beside a small tensor's pieces kept the merge threads waiting (Model Stock, 3 × 2 GB: 0.77–0.82 s with
# only the pass running, 0.55–0.59 s with two; 2026-12-03, two alternations each).
_SCALAR_PASSES_AHEAD = 2
# Merged pieces handed to the writer thread at once. With --direct-io each write waits for the disk; handing over
# one at a time, the main thread waited on the last write before handing over the next, 0.32 s of a 0.79 s task
# arithmetic merge at 3 x 0.5 GB (waits timed by caller, 2026-12-04), while the reader and the merges stood still
_WRITES_AHEAD = 4
# The top-k passes may hold more than one model's work space for the largest tensor (the peak a merge needs
# anyway) where every work space live at once takes at most this share of the merge's input bytes: two models'
# rules of one of the largest tensors side by side (:func:`_topk_side_by_side`), or the largest tensors' passes
# run first beside the merge of the others, which find their rules meanwhile (:func:`_passes_first`). Measured:
# - 3 x 0.5 GB (131 MB per model at the head and embedding, of 1.53 GB): neither. Two at once peaked at 735-740
#   MiB, 0.29-0.30 of mergekit's; the passes first saved time (TIES 3.40-3.55 -> 2.95-3.15 s in-process) but the
#   merge's other work beside the work space raised the peak by 40-50 MiB, 0.24-0.26 of mergekit's (2026-12-04).
# - 3 x 2 GB (262 MB for the passes first plus 2 x 11.3 M entries x 4 B for the MLP tensors' rules beside them:
#   352 MB of 5.95 GB): the passes first. TIES in-process 5.9-7.2 s, median 6.4, against 6.5-8.2, median 6.8, in
#   place (9 runs each, 2026-12-05); peak 861-908 against 743-770 MiB, 0.19-0.20 of mergekit's 4525.
# - Llama-2-7B's shapes with 6 of its 32 layers (3 x 2.95 GB: 524 MB for the passes first plus 360 MB for the
#   45 M-entry MLP tensors' rules, or 2 x 524 MB two at once, of 8.86 GB): neither. Until then each way had a
#   share of its own (1/8 for two at once, 1/16 for the passes' own work space alone) and both ran: TIES peaked at
#   1440-1534 MiB (0.26 of mergekit's 5532), 1556-1623 with two at once alone, 1029-1068 with neither (0.19);
#   in 4 alternated pairs neither took 8.98-9.36 s against 8.21-8.74 (in-process, 2026-12-05): 8 % of the time
#   for 0.45 GB, kept for the peak (TIES in mergekit's order is over its time line anyway: docs/scale.md).
_WORK_SPACE_SHARE = 16
log = logging.getLogger(__name__)


class TensorObserver(Protocol):
    """Sees every merged tensor whole, beside its inputs (``--diagnostics``: per-layer measures computed during
    the merge, not by reading every model again afterwards). With an observer nothing is streamed in pieces."""

    def observe(self, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor],
                merged: torch.Tensor) -> None: ...

    def finish(self, folder: Path, method: str) -> Mapping[str, Any]:
        """Write its files into ``folder`` (the output's temporary folder, installed with the merge of
        ``method``) and return the entry recorded under ``diagnostics`` in ``mergelab.json``."""
        ...


@dataclass
class MergeResult:
    out_dir: Path
    files: list[Path]
    tensors: int
    bytes_written: int
    record: dict[str, Any] = field(default_factory=dict)


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None or str(device) == "cpu":
        return None
    hint = "use cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows; ours says what to do
        raise UsageError(f"--device {device}: not a device name; {hint}") from None
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":  # meta, mps, xla...: tensors there cannot be merged and written by this engine
        raise UsageError(f"--device {device}: mergelab merges on the CPU or a CUDA GPU; {hint}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def _global_thresholds(plan: MergePlan, device: torch.device | None) -> list[float]:
    """Per-model magnitude thresholds for TIES with ``scope: global`` (streamed, exact)."""
    assert plan.base is not None and plan.global_densities is not None  # checked by plan_merge
    float_names = [n for n in plan.names if plan.reference.meta(n).dtype.is_floating_point]
    where = device or "cpu"
    out = []
    for reader, density in zip(plan.models, plan.global_densities, strict=True):

        def stream(reader: CheckpointReader = reader) -> Iterator[torch.Tensor]:
            assert plan.base is not None
            for name in float_names:
                yield reader.get(name).to(where, torch.float32) - plan.base.get(name).to(where, torch.float32)
        out.append(global_threshold(stream, density))
    return out


def _copy_model_files(plan: MergePlan, tmp: Path, device_out_dtype: torch.dtype | None) -> list[str]:
    source = plan.files_folder
    source_tok = plan.tokenizer_folder  # resolved and checked by plan_merge, before any heavy work
    built = plan.tokenizer is not None and plan.tokenizer.tokenizer is not None
    copied = write_tokenizer(plan.tokenizer, tmp) if built else []  # type: ignore[arg-type]
    for name in COPIED_FILES:
        src_dir = source if name in ("config.json", "generation_config.json") else None if built else source_tok
        if src_dir is None or not (src_dir / name).is_file() or refuse_outside(src_dir / name, src_dir):
            continue
        if name == "config.json" and (device_out_dtype is not None or plan.config_updates):
            cfg = json.loads((src_dir / name).read_text())
            if device_out_dtype is not None:
                key = "dtype" if "dtype" in cfg else "torch_dtype"
                cfg[key] = _DTYPE_NAMES.get(device_out_dtype, str(device_out_dtype))
            cfg.update(plan.config_updates)  # e.g. the layer count of layer-stacking slices
            (tmp / name).write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copy2(src_dir / name, tmp / name)
        copied.append(name)
    return copied + copy_extra_files(source, source_tok, tmp, copied, tokenizer_written=built)


def _progress(enabled: bool) -> Progress:
    return make_progress(
        TextColumn("[bold]merging"), BarColumn(),
        TextColumn("{task.fields[tensors]}", markup=False),  # tensor names are user text, not rich markup
        MofNCompleteColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists but belongs to someone else
        return True
    return True


def _remove_stale_temp(out_dir: Path) -> None:
    """Remove ``.OUT.tmp-PID`` folders left by a merge that was killed (SIGKILL, power loss).

    A killed process cannot clean up after itself; its half-written folder never carries the final name,
    but without this it would stay beside OUT forever. Folders of live processes are left alone.
    """
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-(\d+)$")
    if not out_dir.parent.is_dir():
        return
    for entry in out_dir.parent.iterdir():
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (or itself) that does not exist yet, if any."""
    missing = None
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_created(created: Path | None, folder: Path) -> None:
    """Remove the (now empty) folders from ``folder`` up to ``created`` that this merge made."""
    if created is None:
        return
    for p in (folder, *folder.parents):
        try:
            p.rmdir()  # only ever removes empty folders
        except OSError:
            return
        if p == created:
            return


def _protected(plan: MergePlan, config: object, config_folder: Path | None) -> list[tuple[str, Path]]:
    """Everything the user owns that a merge reads: OUT may be none of these, nor hold any of them."""
    owned: list[tuple[str, Path]] = [("input checkpoint", f) for r in plan.readers for f in r.files]
    owned += [("input model", r.path) for r in plan.readers]
    owned += [(what, p) for what, p in (("the folder config.json is copied from", plan.files_folder),
                                        ("tokenizer source", plan.tokenizer_folder),
                                        ("the config's folder", config_folder)) if p is not None]
    if isinstance(config, (str, Path)):
        owned.append(("the config file", Path(config)))
    owned.append(("the working directory", Path.cwd()))
    return owned


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse up front when the output cannot fit, rather than fail after most of the work."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:  # cannot tell: let the writer find out
        return
    if free < needed + _HEADROOM:
        raise OutputError(f"{folder}: not enough disk space for the merged model: it needs about "
                          f"{needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; free some space or "
                          "choose another output folder with -o")


def _input_bytes(plan: MergePlan) -> int:
    """Bytes of every input tensor the merge reads (the dry run's measure of a merge's size too)."""
    return sum(r.meta(n).nbytes for r in plan.readers for n in plan.names if n in r)


def _loads_kernels(plan: MergePlan) -> bool:
    """Whether the merge loads the compiled loops first (a method that has them, large enough). Also for a GPU
    merge: its selections stay on the CPU (a top-k edge of tied magnitudes is ordered by the replay of the
    CPU's sort), and every loop refuses tensors that are not on the CPU. The replay over a whole task vector,
    as the GPU path runs it, took 0.05 -> 0.02 s for a 2.8 M-entry one and 0.75-1.63 -> 0.47-0.53 s for the
    32.8 M-entry head with the loops (3 x 0.5 GB, 2026-12-04); TIES on an H200 had taken 8.4 s without them."""
    return plan.method.compiled and _input_bytes(plan) >= _WARM_UP_BYTES


def _io_error(exc: OSError, out: Path) -> OutputError:
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = " The disk is full: free some space or choose another output folder with -o."
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = " Check that you may write to that folder, or choose another one with -o."
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR) and exc.filename and Path(exc.filename).is_file():
        hint = f" {exc.filename} is a file, not a folder: choose an output folder under a folder with -o."
    what = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
    return OutputError(f"{out}: the merge failed with an I/O error: {what}. Nothing was written under {out} "
                       f"and the temporary files were removed.{hint}")


def run_merge(
    config: str | Path | Mapping[str, Any] | MergeConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    max_shard_size: int | str = "5GB",
    allow_nonfinite: bool = False,
    progress: bool = True,
    hash_inputs: bool = True,
    digest: DigestAlgorithm = DEFAULT_DIGEST,
    take_missing_from: str | None = None,
    model_card: bool = True,
    intermediate_dir: str | Path | None = None,
    record_extra: Mapping[str, Any] | None = None,
    observer: TensorObserver | None = None,
    direct_io: bool = False,
) -> MergeResult:
    """Merge the checkpoints described by ``config`` into the folder ``out_dir``.

    Raises :class:`~mergelab.errors.MergeLabError` subclasses with actionable messages; on any error no
    ``out_dir`` is created and an existing one is left as it was. ``take_missing_from="base"`` serves tensors
    a model lacks from the base (and leaves out those only a model has); ``model_card`` writes README.md.
    A multi-document YAML is a multi-stage merge (merge/stages.py): named stages go to ``intermediate_dir``
    (kept) or a temporary folder. ``record_extra``: more keys for ``mergelab.json``. ``observer``: sees each
    merged tensor whole with its inputs (:class:`TensorObserver`) and writes its files beside the merge.
    ``direct_io``: write the weights with ``O_DIRECT`` where the file system takes it (io/output_file.py: on
    a VM that hands free memory back to its host, a new 0.47 GiB file took 0.20 s that way against 0.76 s through
    the page cache); the same bytes. ``digest``: the algorithm of the inputs' digests in ``mergelab.json``
    (io/file_hashes.py: blake3, or sha256 to compare with the Hugging Face Hub's LFS oids); ``hash_inputs=False``
    records none.
    """
    try:
        digest_algorithm(digest)
    except ValueError as exc:
        raise UsageError(f"{exc} (or turn the digests off: --no-hash, hash_inputs=False)") from None
    if isinstance(config, (str, Path)) and (docs := read_stage_documents(Path(config))) is not None:
        if observer is not None:
            raise UsageError(f"{config} is a multi-stage config: per-layer diagnostics are computed for one merge; "
                             "run the last stage's document on its own to diagnose it")
        # several YAML documents: a multi-stage merge (merge/stages.py), each stage one run_merge
        def run_one(stage: dict[str, Any], target: Path, extra: Mapping[str, Any] | None = None) -> MergeResult:
            return run_merge(stage, target, overwrite=overwrite, device=device, max_shard_size=max_shard_size,
                             allow_nonfinite=allow_nonfinite, progress=progress, hash_inputs=hash_inputs,
                             digest=digest, take_missing_from=take_missing_from, model_card=model_card,
                             record_extra=extra, direct_io=direct_io)
        check_replaceable(Path(out_dir), overwrite)
        return run_stages(Path(config), docs, Path(out_dir), intermediate_dir=intermediate_dir, run_one=run_one)
    cfg, folder = load_config(config)
    out = Path(out_dir)
    if exists(out) and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise ConfigError(f"--max-shard-size: {exc}") from None
    dev = _resolve_device(device)
    plan = plan_merge(cfg, folder, take_missing_from=take_missing_from)
    log.info("%s: %d tensors from %d input(s) into %s", cfg.merge_method, len(plan.names), len(plan.readers), out)
    for label, names in plan.taken_from_base.items():
        log.warning("%s lacks %d tensor(s), taken from the base: %s", label, len(names), ", ".join(names[:5]))
    for label, names in plan.dropped.items():
        log.warning("%s has %d tensor(s) the base lacks, left out: %s", label, len(names), ", ".join(names[:5]))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    created = _first_missing(out.parent)  # removed again if the merge fails: nothing written means nothing
    try:
        check_replaces_nothing_owned(out, _protected(plan, config, folder))
        check_replaceable(out, overwrite)  # after the inputs' check, whose message says more
        _check_free_space(out.parent, sum(m.nbytes for m in plan.out_metas.values()))
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(out)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as exc:
        plan.close()
        _remove_created(created, out.parent)
        raise _io_error(exc, out) from exc
    except BaseException:
        plan.close()
        _remove_created(created, out.parent)
        raise
    if _loads_kernels(plan):
        warm_up_in_background()
    # the digests run on the pool's threads beside the merge; those the CLI started before importing torch
    # (merge/inputs.py) are the same jobs
    hashes: dict[str, Future[tuple[str, bool]]] = {}
    try:
        if hash_inputs:
            for reader in plan.readers:
                for f in reader.files:
                    if str(f) not in hashes:
                        hashes[str(f)] = DIGESTS.acquire(f, algorithm=digest)
        result = _stream(plan, tmp, cfg, dev, shard_bytes, allow_nonfinite, progress, observer, direct_io)
        copied = _copy_model_files(plan, tmp, cfg.output_dtype)
        record = {
            "mergelab_version": _version(),
            "method": cfg.merge_method,
            "paper": plan.method.paper,
            "seed": cfg.seed,
            "parameters": cfg.parameters,
            "base_model": cfg.base_model if plan.base is not None else None,
            "models": [{"model": label, "parameters": s}
                       for label, s in zip(plan.labels, plan.model_settings, strict=True)],
            "dtype": cfg.dtype,
            "out_dtype": cfg.out_dtype,
            "device": str(dev or "cpu"),
            "num_layers": plan.num_layers,
            "tensors": result[0],
            "bytes": result[1],
            # how the weights were written (asked for O_DIRECT and got it, or through the page cache)
            "direct_io": result[2],
            "copied_files": copied,
            "warnings": plan.warnings,
            # from_cache: digests reused from io/file_hashes.py's cache (file unchanged since hashed); the rest
            # computed now
            "input_digests": {"algorithm": digest, "files": {k: v.result()[0] for k, v in hashes.items()},
                              "from_cache": [k for k, v in hashes.items() if v.result()[1]]} if hash_inputs else None,
            # the Hub's sha256 of inputs that are files of a Hugging Face cache snapshot, read from the cache's
            # blob names (io/hub.py): a record stays comparable with a Hub revision whatever --hash says
            "hub_lfs_oids": {str(f): oid for r in plan.readers for f in r.files if (oid := cached_lfs_oid(f))},
            "input_paths": {label: str(r.path.absolute()) for label, r in zip(
                ([cfg.base_model] if plan.base is not None else []) + plan.labels, plan.readers, strict=True)},
        }
        if plan.taken_from_base or plan.dropped:
            record["taken_from_base"], record["dropped"] = plan.taken_from_base, plan.dropped
        if observer is not None:
            record["diagnostics"] = dict(observer.finish(tmp, cfg.merge_method))
        record.update(record_extra or {})
        if plan.tokenizer is not None and plan.tokenizer.vocabulary is not None:
            record["tokenizer"] = {"source": cfg.token_source, "vocab_size": plan.tokenizer.vocabulary.rows,
                                   "aligned_tensors": sorted(plan.input_models)}
        config_yaml = yaml.safe_dump(cfg.model_dump(exclude_none=True, exclude={"slices"}), sort_keys=False)
        (tmp / "mergelab_config.yml").write_text(config_yaml)
        # what this merge wrote, so that a later --overwrite replaces these files and refuses anyone else's
        record["files"] = written_files(tmp, RECORD_NAME, *(["README.md"] if model_card else []))
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if model_card:
            (tmp / "README.md").write_text(render_model_card(record, config_yaml, library=library_name(tmp),
                                                             name=cfg.name), encoding="utf-8")
        files = sorted(p.name for p in tmp.iterdir())
        _install(tmp, out, overwrite)
    except OSError as exc:  # disk full, permissions...: a message, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created, out.parent)
        raise _io_error(exc, out) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created, out.parent)
        raise
    finally:
        for future in hashes.values():  # a failed merge stops its digests within one read block
            DIGESTS.release(future)
        plan.close()
    return MergeResult(out, [out / f for f in files], result[0], result[1], record)


def _version() -> str:
    from mergelab._version import __version__

    return __version__


def _stream(plan: MergePlan, tmp: Path, cfg: MergeConfig, dev: torch.device | None, shard_bytes: int,
            allow_nonfinite: bool, show_progress: bool, observer: TensorObserver | None = None,
            direct_io: bool = False) -> tuple[int, int, bool]:
    thresholds = _global_thresholds(plan, dev) if plan.global_densities is not None else None
    # an observer sees whole tensors
    pieces = _pieces(plan, _PIECE_ENTRIES if observer is None else sys.maxsize, dev, cfg.compute_dtype)
    passes_first = _passes_first(plan, pieces, cfg.compute_dtype, dev)
    pieces = [p for p in pieces if p.name not in passes_first] + [p for p in pieces if p.name in passes_first]
    writer = StreamingSafetensorsWriter(tmp, ShardPlan.build(plan.out_metas, shard_bytes),
                                        metadata={"format": "pt", "mergelab_method": cfg.merge_method},
                                        direct=direct_io, order=list(dict.fromkeys(p.name for p in pieces)))
    problems: list[str] = []
    try:
        # One torch thread for the whole stream. Its ops are small (1 Mi-entry pieces) and its parallelism is
        # the reader, merge and writer threads; a second OpenMP thread spin-waited between the pieces' ops on
        # these 2 cores: linear 3 × 0.5 GB took 21.2 CPU s on torch's 2 threads against 1.6 on one when the
        # inputs were not scanned (OMP_WAIT_POLICY=passive: 1.8), and 1.9–2.4 against 1.8–2.1 when they were,
        # at load 4–5 (2026-12-01; benchmarks/linear_stages.py --stages pipelined pipelined_threads
        # pipelined_unscanned pipelined_threads_unscanned). Whole-tensor passes took one
        # thread already (core.one_thread: their sums then do not depend on the thread count).
        with one_thread():
            _merge_all(plan, cfg, dev, writer, pieces, passes_first, thresholds, allow_nonfinite, show_progress,
                       problems, observer)
    except BaseException:
        writer.abort()  # close the open shards; the caller removes the temporary folder
        raise
    if problems:
        writer.abort()
        raise CompatibilityError(problems)
    writer.close()
    return len(plan.names), sum(m.nbytes for m in plan.out_metas.values()), writer.direct_io


@dataclass(frozen=True)
class _Piece:
    """A unit of streaming: a whole tensor, or the flat range ``[start, stop)`` of one."""

    name: str
    nbytes: int
    start: int = 0
    stop: int | None = None  # None: the whole tensor


def _streams_with_topk(plan: MergePlan, name: str, dev: torch.device | None) -> bool:
    """Whether tensor ``name`` is merged in pieces after each model's top-k rule is found over all of it."""
    topk_pass = plan.method.topk_pass
    params = plan.params.get(name)
    return (topk_pass is not None and params is not None and plan.base is not None
            and plan.global_densities is None and (dev is None or dev.type == "cpu")
            and bool(topk_pass.applies(params.params)))


def _streams_with_scalars(plan: MergePlan, name: str, dev: torch.device | None,
                          compute_dtype: torch.dtype | None) -> bool:
    """Whether tensor ``name`` is merged in pieces after the method's scalar pass over all of it."""
    scalar_pass = plan.method.scalar_pass
    params = plan.params.get(name)
    if scalar_pass is None or params is None or (dev is not None and dev.type != "cpu"):
        return False
    stored = plan.reference.meta(name).dtype
    dtype = compute_dtype or (torch.float32 if stored in FLOAT8_DTYPES else stored)  # as core.prepared makes it
    return bool(scalar_pass.applies(params.params, dtype)) and _piece_unit(plan, name) is not None


def _piece_unit(plan: MergePlan, name: str) -> int | None:
    """The entries a piece of tensor ``name`` must hold a whole number of (1: any flat range), or None where
    the method's scalar pass says it merges whole (DELLA's tensors of fewer than 2 dims: one ranked row)."""
    scalar_pass = plan.method.scalar_pass
    if scalar_pass is None or scalar_pass.unit is None:
        return 1
    return scalar_pass.unit(tuple(plan.out_metas[name].shape))


def _pieces(plan: MergePlan, entries: int, dev: torch.device | None = None,
            compute_dtype: torch.dtype | None = None) -> list[_Piece]:
    """Element-wise methods stream tensors larger than ``entries`` in flat pieces: neither the inputs nor
    the result of such a tensor is ever whole in memory, and the small buffers are reused by the allocator
    instead of being faulted in fresh for every tensor (which cost more than the arithmetic). So do the
    methods that stream after a top-k (TIES, Breadcrumbs), their rules found first (:func:`_topk_rules`), and
    those with a scalar pass (SLERP), run first over the whole tensor (:func:`_flat_source`), in pieces of
    whole units where the method asks for them (DELLA: whole slices along dim 0, at least one)."""
    pieces = []
    for name in plan.names:
        meta = plan.out_metas[name]
        numel = meta.numel
        by_scalars = not plan.method.elementwise and _streams_with_scalars(plan, name, dev, compute_dtype)
        streamed = plan.method.elementwise or _streams_with_topk(plan, name, dev) or by_scalars
        if not streamed or numel <= entries or name in plan.input_models:
            pieces.append(_Piece(name, meta.nbytes))
            continue
        unit = (_piece_unit(plan, name) or 1) if by_scalars else 1
        step = max(unit, entries // unit * unit)
        if step >= numel:
            pieces.append(_Piece(name, meta.nbytes))
            continue
        for a in range(0, numel, step):
            b = min(numel, a + step)
            pieces.append(_Piece(name, (b - a) * meta.dtype.itemsize, a, b))
    return pieces


def _fit_together(piece: _Piece, next_piece: _Piece, budget: int) -> bool:
    """Whether ``next_piece`` may be read while ``piece`` merges: both small (a streamed piece or a small
    tensor: a few MiB beside the inputs of one largest tensor), or together no larger than the largest.
    Before 2026-12-02 only the second held, and a model streamed whole in 1 Mi-entry pieces (every large
    tensor of an element-wise merge) read each piece after the previous one was merged: the reader never
    ran beside the merge (linear, 3 × 0.5 GB: wall time equal to CPU time, one core busy)."""
    small = max(piece.nbytes, next_piece.nbytes) <= _SIDE_BY_SIDE_BYTES
    return small or piece.nbytes + next_piece.nbytes <= budget


def _passes_first(plan: MergePlan, pieces: list[_Piece], compute_dtype: torch.dtype | None = None,
                  dev: torch.device | None = None) -> list[str]:
    """The streamed tensors whose top-k passes run first, one after the other on a thread of their own beside
    the rest of the merge, and whose pieces merge last: the largest (over half the largest tensor's entries,
    as the head and the embedding of a language model), whose pass could not run beside the merge of the
    tensor before it (together they are larger than the largest: ``pass_ahead`` in :func:`_merge_all`), so
    that every other piece waited for it. Only where the work spaces live meanwhile (one model's for the
    largest of them, and the one the other tensors' rules are found in, as many models side by side as
    :func:`_topk_side_by_side` says) take at most 1/:data:`_WORK_SPACE_SHARE` of the input bytes, and not for
    scalar passes (Model Stock's head pass is a fifth of TIES': 5 alternated pairs, 1.08-1.20 s before,
    1.08-1.25 after, and 40 MiB more peak). Empty where no other tensor is left to merge beside them. The
    output's bytes are the same in any order: each tensor goes to its planned place
    (:class:`~mergelab.io.writer.StreamingSafetensorsWriter`)."""
    if (plan.method.scalar_pass is not None or plan.method.topk_pass is None or plan.method.elementwise
            or plan.base is None):
        return []
    largest = max((m.numel for m in plan.out_metas.values()), default=0)
    first = [p.name for p in pieces
             if p.stop is not None and p.start == 0 and 2 * plan.out_metas[p.name].numel > largest]
    if not first or len(first) == len({p.name for p in pieces}):
        return []
    # both work spaces are live at once: the passes' own (one model at a time) and the other tensors' beside them
    live = (max(_topk_work_space(plan, name, 1, compute_dtype) for name in first)
            + _work_space_beside(plan, pieces, first, compute_dtype, dev))
    return first if live * _WORK_SPACE_SHARE <= _input_bytes(plan) else []


@contextlib.contextmanager
def _cancelled_on_exit(pool: ThreadPoolExecutor) -> Iterator[ThreadPoolExecutor]:
    """``pool``, shut down on exit with what it has not started cancelled (a merge that failed or was stopped
    does not wait for the passes queued to run first, only for the one running)."""
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merge_threads(plan: MergePlan, dev: torch.device | None) -> int:
    """How many pieces merge at once (:func:`_merge_all`): two where there are two cores, except on a GPU.
    A piece's merge is a function of its own inputs and of its tensor's whole-tensor pass, so the bytes do
    not depend on it; a randomized method's pieces (DARE, DELLA) get their coins reserved in the pieces' order
    before they merge (:class:`~mergelab.methods.registry.PieceScalars`), so they too may merge side by side."""
    if dev is not None and dev.type != "cpu":
        return 1
    return min(_MERGE_THREADS, available_cores())


Inputs = tuple[torch.Tensor | None, list[torch.Tensor]]  # flat ranges of the base (None without one) and models


class _KeptInputs:
    """The inputs of one streamed tensor as its checkpoints hold them, read whole the first time its
    whole-tensor pass asks for a range, then sliced: for the pass's later ranges (SLERP reads every chunk
    twice) and for the tensor's pieces, which the reader thread then cuts from here instead of reading the
    files again. A pass that reads nothing (DARE's coins) leaves it empty, and the pieces are read as usual.
    Not for a top-k pass: keeping its inputs cost 160 MiB more peak RSS in a TIES merge of 3 × 2 GB for no
    measurable gain in time (alternating runs, 2026-12-03)."""

    def __init__(self, plan: MergePlan, name: str) -> None:
        self._plan, self._name = plan, name
        self._inputs: Inputs | None = None  # filled on the pass's thread; read by others once the pass is over

    @staticmethod
    def sizes(plan: MergePlan, name: str) -> list[int]:
        """The bytes of each input of tensor ``name`` (base first)."""
        readers = ([plan.base] if plan.base is not None else []) + plan.inputs_for(name)[0]
        return [r.meta(name).nbytes for r in readers]

    @staticmethod
    def fits(plan: MergePlan, name: str) -> bool:
        """Whether tensor ``name``'s inputs are small enough to keep (:data:`_KEPT_BYTES`)."""
        sizes = _KeptInputs.sizes(plan, name)
        return sum(sizes) <= _KEPT_BYTES and max(sizes, default=0) <= MMAP_THRESHOLD

    def read(self, a: int, b: int) -> Inputs:
        """Entries ``[a, b)`` of the flattened base and models (views of the whole tensors)."""
        if self._inputs is None:
            self._inputs = _read_flat(self._plan, self._name, 0, self._plan.out_metas[self._name].numel)
        base_t, tensors = self._inputs
        return (base_t[a:b] if base_t is not None else None), [t[a:b] for t in tensors]

    @property
    def loaded(self) -> bool:
        return self._inputs is not None


def _read_flat(plan: MergePlan, name: str, a: int, b: int) -> Inputs:
    """Entries ``[a, b)`` of the flattened inputs of tensor ``name``, read from the checkpoints."""
    base = plan.base
    return (base.get_flat(name, a, b) if base is not None else None,
            [r.get_flat(name, a, b) for r in plan.inputs_for(name)[0]])


def _flat_source(plan: MergePlan, name: str, compute_dtype: torch.dtype | None,
                 kept: _KeptInputs | None = None) -> FlatSource:
    """The inputs of tensor ``name`` (base and models), read in flat ranges on demand (from ``kept`` where
    given, else from the checkpoints), as the method gets them (:func:`~mergelab.merge.core.prepared`): what
    a scalar pass sees."""
    def read(a: int, b: int) -> Inputs:
        base_piece, pieces = kept.read(a, b) if kept is not None else _read_flat(plan, name, a, b)
        return (prepared(base_piece, None, compute_dtype) if base_piece is not None else None,
                [prepared(p, None, compute_dtype) for p in pieces])
    return FlatSource(tuple(plan.out_metas[name].shape), read, read_ahead=kept is None)


class TopKRules(NamedTuple):
    """Each model's top-k rule of one tensor (:func:`_topk_rules`), and whether their keys proved every input
    entry finite (every model's, the base's: :func:`~mergelab.methods.task_vectors.checked_task_vector_keys`):
    the pieces then skip the NaN/Inf scan of their inputs, as after a scalar pass (:class:`_PassResult`)."""

    rules: list[TopK] | None  # None: a model's task vector holds a NaN, or an input an Inf (``nan_stops``)
    inputs_finite: bool


def _topk_rules(plan: MergePlan, name: str, compute_dtype: torch.dtype | None, entries: int, *,
                threads: int = 1, workspace: RankWorkspace | None = None, nan_stops: bool = False) -> TopKRules:
    """Each model's exact top-k of its task vector ``name`` (the method's rank rule: TIES' top-k,
    Breadcrumbs' band), read in flat pieces of ``entries``: only the magnitude keys of one model's task
    vector are whole in memory (2 bytes per entry in bf16) with the sort replay's work space where ties
    straddle a kept rank's edge, instead of every input and the work space of a whole-tensor merge. Where
    keys cannot decide (NaN, float64), the task vector is made whole and the rule is its mask. ``threads``:
    how many models' rules may be found at once (each on its own thread). ``workspace``: where the keys and
    the sort replay's positions go, instead of fresh memory. ``nan_stops``: no rules (None) where a model's
    task vector holds a NaN or an input an Inf, for a merge that will refuse it: the inputs of a piece whose
    keys prove nothing are scanned there, so that the rules stop at an Inf too, and where the scan finds them
    finite it proves them."""
    assert plan.base is not None and plan.method.topk_pass is not None
    topk_pass = plan.method.topk_pass
    base = plan.base
    readers, _ = plan.inputs_for(name)
    params = plan.params[name]
    numel = plan.out_metas[name].numel
    base_clean: set[int] = set()  # the base's pieces (by start) scanned and found finite (``nan_stops``)

    def task_vector_piece(reader: CheckpointReader, a: int, b: int) -> torch.Tensor:
        base_piece = prepared(base.get_flat(name, a, b), None, compute_dtype)
        return task_vector(prepared(reader.get_flat(name, a, b), None, compute_dtype), base_piece,
                           arithmetic_dtype(base_piece, compute_dtype))

    def rule_of(reader: CheckpointReader, model_params: Mapping[str, Any]) -> tuple[TopK | None, bool]:
        keys: torch.Tensor | None = None
        finite = True  # every key so far below +Inf's
        positions: np.ndarray | None = None
        slot = None  # of the workspace, where the keys and positions are
        try:
            for a in range(0, numel, entries):
                b = min(numel, a + entries)
                base_raw = base.get_flat(name, a, b)
                base_piece = prepared(base_raw, None, compute_dtype)
                arithmetic = arithmetic_dtype(base_piece, compute_dtype)
                if keys is None:
                    spec = KEY_SPECS.get(arithmetic)
                    if spec is None:  # float64: no keys
                        break
                    slot = workspace.take(side_by_side, numel, spec[0]) if workspace is not None else None
                    if slot is not None:
                        _, keys, positions = slot
                    else:
                        keys = torch.empty(numel, dtype=spec[0])
                # written into the whole tensor's keys, in one compiled pass where the loops are loaded
                model_raw = reader.get_flat(name, a, b)
                found = checked_task_vector_keys(prepared(model_raw, None, compute_dtype), base_piece, arithmetic,
                                                 out=keys[a:b])
                if nan_stops and found is not None and not found[1]:  # an Inf, or a difference past the range
                    if count_nonfinite(model_raw) or (a not in base_clean and count_nonfinite(base_raw)):
                        return None, False  # an Inf: as at a NaN, the merge will refuse it
                    base_clean.add(a)
                    found = (found[0], True)  # proved by the scan
                if found is None:  # a NaN
                    keys = None
                    if nan_stops:
                        return None, False
                    break
                finite &= found[1]
            rule = topk_pass.of_keys(keys, model_params, positions) if keys is not None else None
        finally:
            if slot is not None:
                workspace.give_back(slot[0])  # type: ignore[union-attr]
        del keys, positions, slot
        if rule is None:
            delta = torch.cat([task_vector_piece(reader, a, min(numel, a + entries))
                               for a in range(0, numel, entries)])
            return TopK(None, kept=topk_pass.of_delta(delta, model_params).reshape(-1)), False
        return rule, finite

    side_by_side = _topk_side_by_side(plan, name, threads, compute_dtype)
    if side_by_side == 1:
        found = []
        for reader, model_params in zip(readers, params.model_params, strict=True):
            found.append(rule_of(reader, model_params))
            if found[-1][0] is None:  # a NaN or Inf, no rules wanted: the other models' are not needed either
                break
    else:
        with ThreadPoolExecutor(max_workers=side_by_side, thread_name_prefix="mergelab-topk") as pool:
            found = list(pool.map(rule_of, readers, params.model_params))
    rules = [rule for rule, _ in found]
    if any(rule is None for rule in rules):
        return TopKRules(None, False)
    return TopKRules(rules, bool(found) and all(finite for _, finite in found))  # type: ignore[arg-type]


def _topk_work_space(plan: MergePlan, name: str, models: int, compute_dtype: torch.dtype | None) -> int:
    """Bytes of the top-k work space that ``models`` models' rules of tensor ``name`` take at once."""
    return plan.out_metas[name].numel * models * (rank_bytes_per_entry(plan, name, compute_dtype) or 0)


def _work_space_beside(plan: MergePlan, pieces: list[_Piece], first: list[str], compute_dtype: torch.dtype | None,
                      dev: torch.device | None = None) -> int:
    """Bytes of the work space where the other tensors' top-k rules are found while the passes of ``first`` run:
    the largest of them times the models found side by side (:func:`_topk_side_by_side`), as :func:`_merge_all`
    sizes it."""
    threads = _merge_threads(plan, dev)
    others = [p.name for p in pieces if p.stop is not None and p.start == 0 and p.name not in first
              and _streams_with_topk(plan, p.name, dev)]
    return max((_topk_work_space(plan, name, _topk_side_by_side(plan, name, threads, compute_dtype), compute_dtype)
                for name in others), default=0)


def _topk_side_by_side(plan: MergePlan, name: str, threads: int, compute_dtype: torch.dtype | None) -> int:
    """How many models' rules of tensor ``name`` a top-k pass finds at once. Each model's rule is its own (the
    sort replay reads only that model's keys): two at once where two such work spaces fit in the largest
    tensor's, so the peak does not grow, or where they take at most 1/_WORK_SPACE_SHARE of the merge's input
    bytes (the largest tensors of a large merge; :func:`rank_bytes_per_entry`)."""
    models = min(threads, len(plan.inputs_for(name)[0]))
    numel = plan.out_metas[name].numel
    if 2 * numel <= max(m.numel for m in plan.out_metas.values()):
        return models
    fits = (rank_bytes_per_entry(plan, name, compute_dtype) is not None
            and _topk_work_space(plan, name, models, compute_dtype) * _WORK_SPACE_SHARE <= _input_bytes(plan))
    return models if fits else 1


def rank_bytes_per_entry(plan: MergePlan, name: str, compute_dtype: torch.dtype | None) -> int | None:
    """The top-k work space's bytes per entry of tensor ``name`` and per model (:meth:`RankWorkspace.bytes_per_entry`
    of the keys :func:`_topk_rules` makes, in the arithmetic its task vectors are computed in); None where that
    arithmetic has no keys (float64: each model's task vector is then made whole instead)."""
    assert plan.base is not None
    like = prepared(torch.empty(0, dtype=plan.base.meta(name).dtype), None, compute_dtype)
    spec = KEY_SPECS.get(arithmetic_dtype(like, compute_dtype))
    return None if spec is None else RankWorkspace.bytes_per_entry(plan.out_metas[name].numel, spec[0])


@dataclass(frozen=True)
class _PassResult:
    """A streamed tensor's whole-tensor pass: what its pieces need, as keywords of
    :func:`~mergelab.merge.core.merge_tensor`, the inputs it kept for them, and whether its sums
    (:class:`~mergelab.methods.registry.VouchedScalars`) or its top-k keys (:class:`TopKRules`) proved every
    input entry finite: the pieces then skip the NaN/Inf scan of their inputs (Model Stock, 3 × 2 GB, 4
    alternated pairs, pieces cut from kept inputs: the reader's CPU 1.31-1.66 -> 0.41-0.58 s)."""

    whole: dict[str, Any]
    kept: _KeptInputs | None
    inputs_finite: bool
    scanned: list[tuple[str, int]] | None = None  # (input label, NaN/Inf count) where the pass scanned the inputs


def _whole_tensor_pass(plan: MergePlan, name: str, compute_dtype: torch.dtype | None, seed: int,
                       threads: int = 1, kept: _KeptInputs | None = None,
                       workspace: RankWorkspace | None = None, *, nan_stops: bool = False) -> _PassResult:
    """What each piece of tensor ``name`` needs of the whole tensor: the method's scalars, or each model's top-k
    rule (found on up to ``threads`` threads). ``kept``: where the pass reads the inputs from and keeps them for
    the pieces; ``workspace``: a top-k pass's keys and positions (:mod:`mergelab.merge.rank_workspace`);
    ``nan_stops``: no top-k rules (None) where a task vector holds a NaN or an input an Inf (:func:`_topk_rules`)."""
    if plan.method.scalar_pass is not None:
        scalars = vouched_scalars(plan.method, name, _flat_source(plan, name, compute_dtype, kept),
                                  params=plan.params[name], compute_dtype=compute_dtype, seed=seed)
        return _PassResult({"scalars": scalars.value}, kept, scalars.inputs_finite)
    found = _topk_rules(plan, name, compute_dtype, _PIECE_ENTRIES, threads=threads, workspace=workspace,
                        nan_stops=nan_stops)
    return _PassResult({"topk": found.rules}, kept, found.inputs_finite)


def _merge_all(plan: MergePlan, cfg: MergeConfig, dev: torch.device | None,
               writer: StreamingSafetensorsWriter, pieces: list[_Piece], passes_first: list[str],
               thresholds: list[float] | None, allow_nonfinite: bool, show_progress: bool, problems: list[str],
               observer: TensorObserver | None = None) -> None:
    """Merge and write every tensor, in the order of ``pieces`` (whose tensors ``passes_first`` have their
    whole-tensor passes started at once: :func:`_passes_first`); non-finite values are reported in
    ``problems`` (and nothing more is merged once there is one, but every input is still scanned so that
    all of them are reported)."""
    base = plan.base
    total_bytes = sum(m.nbytes for m in plan.out_metas.values())
    base_label = cfg.base_model or "base"
    # (label, tensor name) -> NaN/Inf count, summed over the pieces of a tensor
    nonfinite: Counter[tuple[str, str]] = Counter()
    produced = "merged output"

    # A method that propagates NaN/Inf (linear, task arithmetic) shows a bad input in its result, so only the
    # result is scanned until one is found; the inputs are then scanned to name it. A base that the method
    # ignores (linear given one in slices) would not show: then every input is scanned as it is read.
    trust_result = plan.method.propagates_nonfinite and (base is None or plan.method.base != "ignored")
    # A method that vouches for its inputs (DELLA's one pass reads every task-vector entry) scans them after
    # the merge, on the merge thread, only where it did not (:attr:`MergeMethod.vouching`)
    trust_method = plan.method.vouching is not None

    def scan(name: str, base_t: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[tuple[str, int]]:
        """(input label, NaN/Inf count) of each input of tensor ``name`` that has any."""
        labels = plan.inputs_for(name)[1]
        labelled = ([(base_label, base_t)] if base_t is not None else []) + list(zip(labels, tensors, strict=True))
        return [(label, n) for label, t in labelled if (n := count_nonfinite(t))]

    def load(piece: _Piece) -> tuple[torch.Tensor | None, list[torch.Tensor], list[tuple[str, int]] | None]:
        def get(reader: CheckpointReader) -> torch.Tensor:
            if piece.stop is None:
                return reader.get(piece.name)
            return reader.get_flat(piece.name, piece.start, piece.stop)

        kept = kept_inputs(piece)
        if kept is not None:
            base_t, tensors = kept.read(piece.start, piece.stop)
        else:
            base_t = get(base) if base is not None else None
            readers, _ = plan.inputs_for(piece.name)
            tensors = [get(r) for r in readers]
        if piece.name in plan.input_models:  # token-indexed: rows put in the output vocabulary's order
            inputs = ([base_t] if base_t is not None else []) + tensors
            if cfg.compute_dtype is not None:  # mergekit fills missing rows in the config's dtype
                inputs = [x.to(cfg.compute_dtype) for x in inputs]
            try:
                inputs = plan.align_vocabulary(piece.name, inputs)
            except ValueError as exc:
                raise CompatibilityError([str(exc)]) from None
            base_t, tensors = (inputs[0], inputs[1:]) if base_t is not None else (None, inputs)
        if first_scan(piece) is not None:  # counted by its pass: nothing more to find or to count twice
            return base_t, tensors, []
        # checked here, on the reader thread, so it overlaps the merge; None: left to the merged result's scan
        vouched = piece.name not in plan.input_models and proved_finite(piece)
        found = (None if allow_nonfinite or vouched or ((trust_result or trust_method) and not nonfinite)
                 else scan(piece.name, base_t, tensors))
        return base_t, tensors, found

    first_pass: dict[str, dict[str, Any]] = {}  # top-k rules or scalars of the tensor being streamed
    out_dtypes = {name: meta.dtype for name, meta in plan.out_metas.items()}
    side_by_side = _merge_threads(plan, dev)

    def merge_piece(piece: _Piece, base_t: torch.Tensor | None, tensors: list[torch.Tensor], whole: dict[str, Any],
                    found: list[tuple[str, int]] | None) -> tuple[torch.Tensor, int, list[tuple[str, int]] | None]:
        """The merged piece in the output dtype, its NaN/Inf count (0 when not scanned) and what the scan of its
        inputs found: ``found`` (the reader's), or, where the reader left them to a vouching method
        (``trust_method``) that did not vouch, this thread's scan of them (None: not scanned)."""
        vouched = vouched_merge_tensor(
            plan.method, piece.name, tensors, base=base_t, params=plan.params.get(piece.name),
            seed=cfg.seed, compute_dtype=cfg.compute_dtype, device=dev, thresholds=thresholds,
            offset=piece.start, **whole,
        )
        merged = vouched.merged.to(out_dtypes[piece.name])
        if allow_nonfinite:
            return merged, 0, found
        if found is None and trust_method and not vouched.inputs_finite:
            found = scan(piece.name, base_t, tensors)
        return merged, count_nonfinite(merged), found

    # One work space for every top-k pass, at the largest size still to come (passes run in the pieces' order):
    # a tensor's entries times the models found side by side (until 2026-12-03, 67ca0d9 to this change, only
    # the entries: once shrunk, the work space held one model where two ran, and 60 of a TIES merge's 242 rules
    # at 3 × 2 GB, 90 of 94 at 3 × 0.5 GB, were found in fresh memory).
    ranked = [p.name for p in pieces if p.stop is not None and p.start == 0 and _streams_with_topk(plan, p.name, dev)
              and p.name not in passes_first]
    sizes = [plan.out_metas[n].numel * _topk_side_by_side(plan, n, side_by_side, cfg.compute_dtype) for n in ranked]
    largest_to_come = dict(zip(ranked, list(itertools.accumulate(sizes[::-1], max))[::-1], strict=True))
    workspace = RankWorkspace(largest_to_come[ranked[0]]) if ranked else None
    # The passes that run first find one model's rule at a time, in a work space of their own that is let go
    # after the last of them: they run beside the merge of everything else, which has the other core
    ranked_first = [n for n in passes_first if _streams_with_topk(plan, n, dev)]
    first_workspace = RankWorkspace(max(plan.out_metas[n].numel for n in ranked_first)) if ranked_first else None

    def whole_pass(name: str) -> _PassResult:
        if name in passes_first:
            try:
                return first_pass_of(name)
            finally:
                if first_workspace is not None and name == passes_first[-1]:
                    first_workspace.shrink_to(0)
        kept = _KeptInputs(plan, name) if name in keepable else None
        if workspace is not None and name in largest_to_come:
            workspace.shrink_to(largest_to_come[name])
        return _whole_tensor_pass(plan, name, cfg.compute_dtype, cfg.seed, side_by_side, kept, workspace)

    def first_pass_of(name: str) -> _PassResult:
        """The top-k pass of a tensor whose pass runs first. Its rules stop at a NaN or Inf (the merge will not
        use them; ``nan_stops`` in :func:`_topk_rules`, which also scans the pieces whose keys prove nothing);
        where its inputs are then not proved finite, it scans them all for the counts, so that a bad input of a
        tensor merged last is reported when found, not after everything else, and the passes after it do
        nothing (TIES 3 x 2 GB, a NaN in one model's head: 9.6 s to the error with the head first; with its pass
        first, 22.7-25.6 s when the rules were found from the whole task vector and the error waited for the
        head's turn, 6.5 s now)."""
        def rules(nan_stops: bool) -> _PassResult:
            return _whole_tensor_pass(plan, name, cfg.compute_dtype, cfg.seed, 1, None, first_workspace,
                                      nan_stops=nan_stops)

        if first_found_bad.is_set():  # the merge will be refused: its pieces are only scanned, as they are read
            return _PassResult({"topk": None}, None, False)
        found = rules(not allow_nonfinite)
        if found.inputs_finite or allow_nonfinite or rank_bytes_per_entry(plan, name, cfg.compute_dtype) is None:
            return found
        counts: Counter[str] = Counter()
        numel = plan.out_metas[name].numel
        for a in range(0, numel, _PIECE_ENTRIES):
            base_t, tensors = _read_flat(plan, name, a, min(numel, a + _PIECE_ENTRIES))
            counts.update(dict(scan(name, base_t, tensors)))
        if found.whole["topk"] is None and not counts:  # the NaN the keys met is gone (a file rewritten)
            found = rules(False)
        if counts:
            first_found_bad.set()
        return _PassResult(found.whole, None, False, list(counts.items()))

    # Each streamed tensor's pass, submitted once (by the main thread, or by the reader thread that waits for
    # what it kept) and dropped when the main thread moves on to the next streamed tensor.
    keepable = {p.name for p in pieces if p.stop is not None and p.start == 0 and plan.method.scalar_pass is not None
                and not plan.method.elementwise and _KeptInputs.fits(plan, p.name)}
    passes: dict[str, Future[_PassResult]] = {}
    passes_lock = threading.Lock()
    reported_first: set[str] = set()  # passes run first whose failure or scan the main thread has reported
    first_found_bad = threading.Event()  # a pass run first found a bad input: the later ones find nothing more

    def pass_of(name: str) -> Future[_PassResult]:
        with passes_lock:
            if name not in passes:
                passes[name] = (first_pool if name in passes_first else pass_pool).submit(whole_pass, name)
            return passes[name]

    def kept_inputs(piece: _Piece) -> _KeptInputs | None:
        """What tensor ``piece.name``'s pass read and kept, once it has run; None where it kept nothing or
        failed (the main thread reports that failure)."""
        if piece.stop is None or piece.name not in keepable or nonfinite:  # after a bad input: only scans
            return None
        try:
            kept = pass_of(piece.name).result().kept
        except Exception:  # reported where the main thread waits for the same pass
            return None
        return kept if kept is not None and kept.loaded else None

    def first_scan(piece: _Piece) -> list[tuple[str, int]] | None:
        """What the pass of a tensor whose pass ran first found scanning its inputs (waited for: its pieces come
        after it anyway); None where it did not scan them, failed (reported by the main thread) or ran in place."""
        if piece.stop is None or piece.name not in passes_first:
            return None
        try:
            return pass_of(piece.name).result().scanned
        except Exception:
            return None

    def report_first_passes() -> None:
        """Report a pass run first that failed, or whose scan found a bad input, now: not when its tensor's turn
        comes, after every other tensor (once per pass; its pieces then report nothing more: :func:`first_scan`)."""
        for name in passes_first:
            with passes_lock:
                first = passes.get(name)
            if name in reported_first or first is None or not first.done():
                continue
            reported_first.add(name)
            scanned = method_result(name, first).scanned  # raises what the pass raised
            if scanned and not nonfinite:  # the first bad input: the pieces before it are finished first
                while in_flight:
                    finish_oldest()
            for label, n in scanned or ():
                nonfinite[label, name] += n

    def proved_finite(piece: _Piece) -> bool:
        """Whether tensor ``piece.name``'s pass has ended and proved every input entry finite: for pieces cut
        from what it kept (whose reader waited for it) and for pieces read from the files again (a tensor too
        large to keep), which hold the same bytes. The merged piece is still scanned, and its inputs then too
        where it holds a NaN or Inf, so a file rewritten during the merge cannot slip one into the output.
        Model Stock, 3 x 0.5 GB: 60 of the head's and the embedding's 64 pieces read again skip it, the
        reader's scans 0.15-0.16 -> 0.085-0.091 CPU s (wall within the noise, 8 alternated pairs: medians
        1.23 -> 1.21 s; 2026-12-04)."""
        if piece.stop is None or nonfinite:
            return False
        with passes_lock:
            done = passes.get(piece.name)
        if done is None or not done.done() or done.exception() is not None:
            return False  # not waited for: the reader reads the next pieces while the pass runs
        return done.result().inputs_finite

    # The whole-tensor pass of the next streamed tensor runs on its own thread while this one's pieces merge
    # (SLERP's and Model Stock's scalars, TIES' rules: at 3 × 2 GB the main thread spent 4.6 of SLERP's 8.4 s
    # and 8.2 of Model Stock's 12.5 on them while the merge threads waited; benchmarks/engine_threads.py),
    # where the tensors together are no larger than the largest, so that the peak does not grow; a scalar
    # pass runs up to _SCALAR_PASSES_AHEAD tensors ahead.
    first_pieces = [j for j, p in enumerate(pieces) if p.stop is not None and p.start == 0]
    first_index = {pieces[j].name: j for j in first_pieces}
    largest = max((m.nbytes for m in plan.out_metas.values()), default=0)

    ahead_count = _SCALAR_PASSES_AHEAD if plan.method.scalar_pass is not None else 1

    def pass_ahead(i: int) -> None:
        """Start the passes of the streamed tensors after piece ``i``'s, if any and if they fit beside it."""
        if side_by_side == 1:
            return
        after = bisect.bisect_right(first_pieces, i)
        total = plan.out_metas[pieces[i].name].nbytes
        for j in first_pieces[after:after + ahead_count]:
            # a scalar pass that keeps nothing holds a chunk or two of each input, not the tensor: it runs ahead
            # of any tensor (Model Stock's embedding pass beside the head's pieces, 3 x 0.5 GB, 2026-12-04)
            holds_tensor = plan.method.scalar_pass is None or pieces[j].name in keepable
            total += plan.out_metas[pieces[j].name].nbytes if holds_tensor else 0
            if total > largest:
                break
            pass_of(pieces[j].name)

    # Merged, not yet written: (piece, its merge, its inputs, their NaN/Inf counts if scanned), oldest first.
    in_flight: deque[tuple[_Piece, Future[tuple[torch.Tensor, int, list[tuple[str, int]] | None]],
                           torch.Tensor | None, list[torch.Tensor], list[tuple[str, int]] | None]] = deque()
    # Handed to the writer, not yet written, oldest first, with their sizes: up to _WRITES_AHEAD small ones at once,
    # a larger one only after every write before it (as every write waited for the one before, until 2026-12-04)
    writes: deque[tuple[Future[None], int]] = deque()

    def method_result(name: str, work: Future[Any]) -> Any:
        """The result of the method's work on tensor ``name`` (a piece's merge, the whole-tensor pass).

        Methods reject inputs they cannot merge (weights summing to zero, missing statistics) with
        ValueError, whose message says what to fix; torch fails with RuntimeError (an SVD of non-finite
        values let through by --allow-nonfinite, a GPU out of memory). run_merge promises MergeLabError,
        naming the tensor."""
        try:
            return work.result()
        except (ValueError, RuntimeError, ArithmeticError) as exc:
            why = str(exc) if isinstance(exc, ValueError) else \
                f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            raise CompatibilityError([f"method '{cfg.merge_method}' cannot merge tensor '{name}': "
                                      f"{why}"]) from None

    def finish_oldest() -> None:
        """Wait for the oldest merge in flight, check it and hand it to the writer (in the pieces' order)."""
        piece, merging, base_t, tensors, read_found = in_flight.popleft()
        merged, bad, found = method_result(piece.name, merging)
        if nonfinite:  # a piece merged beside an earlier bad one: its inputs are reported, nothing written
            for label, n in (found if found is not None else scan(piece.name, base_t, tensors)):
                nonfinite[label, piece.name] += n
            return
        if found and read_found is None:  # scanned after the merge (a vouching method that did not vouch)
            for label, n in found:
                nonfinite[label, piece.name] += n
            return
        if observer is not None:
            observer.observe(piece.name, base_t, tensors, merged)
        if bad and found is None:  # the inputs were left unscanned: name the bad ones, if any
            found = scan(piece.name, base_t, tensors)
            for label, n in found:
                nonfinite[label, piece.name] += n
        if bad:
            if not found:
                nonfinite[produced, piece.name] += bad
            return
        size = merged.numel() * merged.element_size()
        while writes and (len(writes) >= _WRITES_AHEAD or max(size, writes[-1][1]) > _SIDE_BY_SIDE_BYTES):
            writes.popleft()[0].result()  # re-raises a write error here, in order
        write = writer.write if piece.stop is None else writer.write_part
        writes.append((writer_pool.submit(write, piece.name, merged), size))
        bar.update(task, advance=piece.nbytes, tensors=piece.name[-40:])

    # Four stages overlap: the reader thread loads and checks piece i+1, the merge threads merge pieces i
    # and i-1 (where the method allows: _merge_threads), the writer thread writes the piece before. A small
    # number of items per stage keeps memory bounded.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read") as reader_pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write") as writer_pool, \
            ThreadPoolExecutor(max_workers=side_by_side, thread_name_prefix="mergelab-merge") as merge_pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-pass") as pass_pool, \
            _cancelled_on_exit(ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-first")) as first_pool, \
            _progress(show_progress) as bar:
        task = bar.add_task("merge", total=total_bytes, tensors="")
        # Reading ahead holds two pieces' inputs at once. Where two of the largest tensors follow one
        # another (lm_head and embed_tokens sort side by side), the next one is read after this one is
        # merged instead, so the peak stays at one largest tensor per input plus the method's work space
        # (:func:`_fit_together`).
        budget = max((p.nbytes for p in pieces), default=0)
        for name in passes_first:
            pass_of(name)
        pending = reader_pool.submit(load, pieces[0]) if pieces else None
        for i, piece in enumerate(pieces):
            assert pending is not None
            base_t, tensors, found = pending.result()
            report_first_passes()
            if found and not nonfinite:  # the first bad input: the pieces before it are finished first
                while in_flight:
                    finish_oldest()
            if found is None and nonfinite and not allow_nonfinite:  # read before the first bad one was found
                found = scan(piece.name, base_t, tensors)
            for label, n in found or ():
                nonfinite[label, piece.name] += n
            has_next = i + 1 < len(pieces)
            read_after_merge = has_next and not nonfinite and not _fit_together(piece, pieces[i + 1], budget)
            if has_next and not read_after_merge:
                pending = reader_pool.submit(load, pieces[i + 1])
            if nonfinite:  # keep scanning so every bad tensor is reported, but merge nothing more
                bar.advance(task, piece.nbytes)
                continue
            # Merges run side by side only on small pieces: a large whole tensor merges alone, so the peak
            # stays at one largest tensor per input plus the method's work space.
            alone = piece.nbytes > _SIDE_BY_SIDE_BYTES
            while in_flight and (alone or len(in_flight) >= side_by_side
                                 or in_flight[-1][0].nbytes > _SIDE_BY_SIDE_BYTES):
                finish_oldest()
            whole: dict[str, Any] = {}  # what a piece needs of its whole tensor
            if piece.stop is not None and not plan.method.elementwise:
                if piece.start == 0:  # before the first piece: the pass over the whole tensor
                    first_pass = {piece.name: method_result(piece.name, pass_of(piece.name)).whole}
                    with passes_lock:  # the reader is past the tensors before this one: what they kept can go
                        for name in [n for n in passes if first_index[n] < i]:
                            del passes[name]
                    pass_ahead(i)
                whole = first_pass[piece.name]
                scalars = whole.get("scalars")
                if isinstance(scalars, PieceScalars):  # reserved here, in order: the merges may then run side by side
                    whole = {**whole, "scalars": scalars.for_piece(cfg.merge_method, piece.start,
                                                                   piece.stop - piece.start)}
            in_flight.append((piece, merge_pool.submit(merge_piece, piece, base_t, tensors, whole, found), base_t,
                              tensors, found))
            del base_t, tensors
            if read_after_merge:
                while in_flight:
                    finish_oldest()
                pending = reader_pool.submit(load, pieces[i + 1])
        while in_flight:
            finish_oldest()
        while writes:
            writes.popleft()[0].result()
    # A whole-tensor step (Model Stock's ratio, SLERP's coefficients) spreads one input's NaN to every piece of
    # its tensor, also to pieces merged before the bad one was read: that input, named, is the cause
    named = {name for label, name in nonfinite if label != produced}
    for (label, name), n in nonfinite.items():
        if label == produced and name in named:
            continue
        message = nonfinite_message(label, name, n)
        if label == produced:
            message += f" (method '{cfg.merge_method}' produced it from finite inputs)"
        problems.append(message)
