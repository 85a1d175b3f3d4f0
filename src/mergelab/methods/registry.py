"""Registry of merge methods.

Every method is a pure function on aligned tensors (``ties_merge``, ``slerp_merge``...). The registry
adds what the engine and the CLI need around it: the parameters it takes (global or per model), whether
it needs a base model, how many inputs it accepts and the paper it comes from. An *adapter* turns one
:class:`TensorInputs` (the tensors of one name from every model, parameters already resolved for that
name) into a call of the pure function, so the engine never knows a method's signature. The adapter is
derived from the declarations (:func:`derive_adapter`): each :class:`Param` fills the function's keyword
of the same name, and the inputs fill the parameters named after them (``base``, ``tensors``...).
"""

from __future__ import annotations

import inspect
import keyword
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    import numpy as np

REQUIRED: Any = object()
PEER_TOOLS = ("mergekit", "FusionBench")
"""Tools compared against: mergekit 0.1.5 (arcee-ai/mergekit) and FusionBench 0.2.33 (tanganke/fusion_bench)."""
BasePolicy = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``scope="model"`` parameters are given per input model (``models[i].parameters``) and may fall back to
    the global ``parameters`` block, as in mergekit; ``scope="global"`` ones apply to the whole merge.
    """

    name: str
    kind: type
    default: Any = REQUIRED
    scope: Literal["global", "model"] = "global"
    help: str = ""
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    arg: str | None = ""
    """The keyword of the method's function this parameter fills. ``""``: derived from the name (see
    :meth:`keyword`); ``None``: accepted for mergekit compatibility and not passed on (``int8_mask``)."""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def keyword(self, one_model: bool) -> str | None:
        """The function's keyword: the name (``lambda`` → ``lambda_``); a per-model parameter fills the
        plural with one value per model (``density`` → ``densities``), or, for a method of exactly one
        model (``one_model``), the name with that model's value."""
        if self.arg != "":
            return self.arg
        name = self.name
        if self.scope == "model" and not one_model:
            name = name[:-1] + "ies" if name.endswith("y") else name + "s"
        return name + "_" if keyword.iskeyword(name) else name

    def validate(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's type or raise ``ValueError`` naming ``where``."""
        kind = self.kind
        try:
            if kind is bool:
                if not isinstance(value, bool):
                    raise TypeError
                out: Any = value
            elif kind in (float, int):
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise TypeError
                number = float(value)
                # a string such as "1e309" or "nan" (YAML reads a number without a dot as a string) passed the
                # config's check of float scalars: refused here, where every number is converted
                finite = math.isfinite(number)
                out = kind(number) if kind is int and finite else number
                if kind is int and finite and number != int(number):
                    raise TypeError
            else:
                out = kind(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: parameter '{self.name}' must be {kind.__name__}, got {value!r}"
            ) from None
        if kind in (float, int) and not math.isfinite(out):
            raise ValueError(f"{where}: parameter '{self.name}' must be a finite number, got {value!r}")
        if self.choices is not None and out not in self.choices:
            raise ValueError(
                f"{where}: parameter '{self.name}' must be one of {list(self.choices)}, got {out!r}"
            )
        if self.low is not None and out < self.low:
            raise ValueError(f"{where}: parameter '{self.name}' must be >= {self.low}, got {out!r}")
        if self.high is not None and out > self.high:
            raise ValueError(f"{where}: parameter '{self.name}' must be <= {self.high}, got {out!r}")
        return out


@dataclass(frozen=True)
class FlatSource:
    """The inputs of one tensor name as flat ranges read on demand: how a method's scalar pass
    (:attr:`MergeMethod.scalar_pass`) sees a tensor that is never whole in memory. The engine reads ranges
    from the checkpoints; a whole-tensor call slices its tensors (:meth:`of`)."""

    shape: tuple[int, ...]
    read: Callable[[int, int], tuple[torch.Tensor | None, list[torch.Tensor]]]
    """``read(a, b)``: entries ``[a, b)`` of the flattened base (None without one) and of each model."""
    read_ahead: bool = False
    """Whether :meth:`chunks` reads the next chunk on a thread of its own while the caller works on this one
    (ranges read from files: the engine's sources of tensors too large to keep whole)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> FlatSource:
        flat_base = base.reshape(-1) if base is not None else None
        flat = [t.reshape(-1) for t in tensors]
        shape = tuple((base if base is not None else tensors[0]).shape)
        return cls(shape, lambda a, b: (flat_base[a:b] if flat_base is not None else None, [t[a:b] for t in flat]))

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor | None, list[torch.Tensor]]]:
        """The ranges ``[0, size)``, ``[size, 2 size)``... in order: a grid fixed by the method, not by how
        the caller holds the tensor, so that sums taken chunk by chunk add up in one order."""
        starts = range(0, self.numel, size)
        if not self.read_ahead or len(starts) < 2:
            for a in starts:
                yield self.read(a, min(self.numel, a + size))
            return
        # Model Stock's pass over a 65 MB bfloat16 head per model read its chunks for about half of its time,
        # on one core while the other waited for that pass (3 x 0.5 GB, direct I/O, 2026-12-04)
        with ThreadPoolExecutor(1, thread_name_prefix="mergelab-pass-read") as reader:
            upcoming = reader.submit(self.read, 0, min(self.numel, size))
            for a in starts:
                chunk = upcoming.result()
                if a + size < self.numel:
                    upcoming = reader.submit(self.read, a + size, min(self.numel, a + 2 * size))
                yield chunk


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name.

    ``tensors`` are the non-base models in config order, ``model_params[i]`` their resolved per-model
    parameters, ``params`` the resolved global ones. ``seed`` is derived by the engine from the merge seed
    and the tensor name, so random methods are reproducible and independent of tensor order.
    ``stats`` carries precomputed statistics for data-aware methods (Fisher, RegMean), and
    ``thresholds`` per-model magnitude thresholds for global-scope sparsification. ``dtype`` is the
    config's arithmetic dtype (mergekit's ``dtype``; None: the method's own choice, float32 for the
    task-vector methods); methods that compute in it as mergekit does pass it on.
    """

    name: str
    tensors: Sequence[torch.Tensor]
    model_params: Sequence[dict[str, Any]]
    params: dict[str, Any]
    base: torch.Tensor | None = None
    seed: int = 0
    stats: Sequence[Any] | None = None
    thresholds: Sequence[float] | None = None
    dtype: torch.dtype | None = None
    topk: Sequence[Any] | None = None
    """Per-model top-k rules (``methods.sparsify.TopK``) over the whole tensor, when the engine streams a
    ``topk_pass`` method's tensor in pieces; ``offset``: where this piece starts (flat)."""
    offset: int = 0
    source: FlatSource | None = None
    """The whole tensor's inputs, read in flat ranges, for a method's scalar pass (``scalar_pass``)."""
    scalars: Any = None
    """What the method's scalar pass returned for the whole tensor, when the engine streams it in pieces:
    ``tensors`` and ``base`` are then flat pieces of it."""

    @property
    def other(self) -> torch.Tensor:
        """The one non-base model of a two-model method (slerp, nearswap, passthrough...)."""
        if len(self.tensors) != 1:
            raise ValueError(f"tensor {self.name}: this method takes exactly one model besides the base, "
                             f"got {len(self.tensors)}")
        return self.tensors[0]


Adapter = Callable[[TensorInputs], torch.Tensor]
INPUTS = ("base", "tensors", "other", "seed", "dtype", "stats", "thresholds", "name", "topk", "offset", "source",
          "scalars")
"""What an adapter can hand a method's function, by parameter name (attributes of :class:`TensorInputs`)."""


def derive_adapter(method: MergeMethod, function: Callable[..., Any] | None = None) -> Adapter:
    """The adapter of ``method``, from its declarations: its function's parameters are filled by name with
    the inputs (:data:`INPUTS`, renamed by ``method.inputs``: slerp's ``v0`` is the base), the resolved
    parameters (:meth:`Param.keyword`) and ``method.fixed``. An input that is None is left to the function's
    default; a function parameter that nothing fills, or a parameter that fills nothing, is an error at
    registration, not in the middle of a merge. ``function``: another function of the method (its scalar
    pass), filled the same way with those of the parameters it takes."""
    signature = inspect.signature(function or method.function)
    fname = (function or method.function).__name__
    one_model = method.max_models == 1
    sources = {method.inputs.get(arg, arg): arg for arg in signature.parameters}
    inputs = {sources[k]: k for k in INPUTS if k in sources}
    params = {p.keyword(one_model): p for p in method.params if p.keyword(one_model) is not None}
    fixed = dict(method.fixed)
    if function is not None:
        params = {k: p for k, p in params.items() if k in signature.parameters}
        fixed = {k: v for k, v in fixed.items() if k in signature.parameters}
    unknown = sorted((set(params) | set(fixed)) - set(signature.parameters))
    if unknown:
        raise ValueError(f"method '{method.name}': {fname} has no parameter {unknown}")
    unfilled = [arg for arg, p in signature.parameters.items() if p.default is inspect.Parameter.empty
                and arg not in inputs and arg not in params and arg not in fixed]
    if unfilled:
        raise ValueError(f"method '{method.name}': nothing fills {fname}'s {unfilled}")
    optional = {arg for arg, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}

    def adapt(x: TensorInputs) -> Any:
        kwargs: dict[str, Any] = dict(fixed)
        for arg, source in inputs.items():
            value = getattr(x, source)
            if value is None and arg not in optional:
                what = "per-model statistics of data (see mergelab.statistics; pass stats=... to " \
                    "merge_state_dicts)" if source == "stats" else f"a {source}"
                raise ValueError(f"{method.name} needs {what} for tensor '{x.name}'")
            if value is not None:
                kwargs[arg] = value
        for arg, p in params.items():
            if p.scope == "global":
                kwargs[arg] = x.params[p.name]
            elif one_model:
                kwargs[arg] = x.model_params[0][p.name]
            else:
                kwargs[arg] = [mp[p.name] for mp in x.model_params]
        return (function or method.function)(**kwargs)
    return adapt


def _always(params: Mapping[str, Any], dtype: torch.dtype) -> bool:
    return True


@dataclass(frozen=True)
class ScalarPass:
    """A method's whole-tensor scalars (:attr:`MergeMethod.scalar_pass`)."""

    function: Callable[..., Any]
    """Takes the tensor's inputs as a :class:`FlatSource` (``source``) and the method's parameters it names;
    returns what the method's function takes as ``scalars``, or a :class:`VouchedScalars` holding it. Its sums
    run over its own fixed grid of chunks, so they add up in the same order however the caller holds the
    tensor."""
    applies: Callable[[Mapping[str, Any], torch.dtype], bool] = _always
    """Given a tensor's resolved global parameters and the dtype its inputs reach the method in (the
    config's ``dtype``, else the checkpoint's): whether the scalar pass covers that merge."""
    unit: Callable[[tuple[int, ...]], int | None] | None = None
    """Given a tensor's shape: the entries each piece must hold a whole number of (DELLA: one slice along
    dim 0, where its rows are ranked), or None where the tensor merges whole; no ``unit``: any flat range."""


@dataclass(frozen=True)
class VouchedScalars:
    """A scalar pass's result that also vouches for its inputs: ``value`` is what the method takes as
    ``scalars``; ``inputs_finite`` is True only where the pass's own sums prove every entry of every input in
    its ``source`` finite. A finite 2-norm of each ``x`` or of each ``x − base`` does: a NaN or ±Inf entry of
    ``x`` or ``base`` makes that entry of the difference non-finite, its square too, and a sum of squares (no
    term negative, nothing to cancel) stays non-finite. The engine then skips the NaN/Inf scan of the pieces
    it cuts from those same bytes."""

    value: Any
    inputs_finite: bool


@dataclass(frozen=True)
class VouchedMerge:
    """A merge's result that also vouches for its inputs (:attr:`MergeMethod.vouching`): ``merged`` is what the
    method's function returns; ``inputs_finite`` is True only where its own pass read every entry of every task
    vector ``x − base``, dropped ones included, and found them all finite. An Inf or NaN in ``x`` or ``base``
    makes that entry of the difference Inf or NaN, so the engine then skips the NaN/Inf scan of those inputs
    (a method that drops entries cannot show a bad input in its result)."""

    merged: torch.Tensor
    inputs_finite: bool


@runtime_checkable
class PieceScalars(Protocol):
    """Scalars whose pieces must be prepared in the pieces' order (a random drop's coins, drawn from one
    generator per model): the engine calls :meth:`for_piece` for each piece in order, then may merge the
    pieces side by side with what it returned as their ``scalars``."""

    def for_piece(self, method: str, offset: int, numel: int) -> Any:
        """The scalars of the piece of ``numel`` entries at flat ``offset``, the next one in order."""


@dataclass(frozen=True)
class TopKPass:
    """A method's per-model magnitude-rank rules (:attr:`MergeMethod.topk_pass`)."""

    applies: Callable[[Mapping[str, Any]], bool]
    """Given a tensor's resolved global parameters: whether the rules are the merge's only whole-tensor step."""
    of_keys: Callable[[torch.Tensor, Mapping[str, Any], np.ndarray | None], Any]
    """``(keys, model_params, positions)``: the rule (``methods.sparsify.TopK``) of a model's whole task vector
    from its flat magnitude keys (``sparsify.magnitude_keys``, which it may overwrite), or None where keys
    cannot decide (the sort must be run for real); ``positions``: scratch space for the sort replay's flat
    indices (``std_sort.kept_ties``; None: a fresh array)."""
    of_delta: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]
    """``(delta, model_params)``: the kept entries of a model's whole task vector, where keys cannot decide
    (NaN, float64) or ``of_keys`` returned None."""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    function: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    summary: str
    paper: str
    base: BasePolicy = "required"
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    needs_stats: bool = False
    """The method needs per-model statistics of data (Fisher diagonals, Gram matrices) in ``stats``."""
    elementwise: bool = False
    """Each merged entry depends only on the inputs' entries at the same position (no norms, thresholds or
    random streams over the whole tensor), so merging any flat slice of the inputs gives exactly that slice
    of the merged tensor. The engine then streams large tensors in pieces (tests check the equality)."""
    propagates_nonfinite: bool = False
    """Wherever an input entry is NaN or ±Inf, so is the merged entry (every input is scaled and added, even at
    weight 0: 0·NaN = NaN, 0·Inf = NaN). The engine then scans only the merged result for NaN/Inf and
    scans the inputs only to name the culprit once the result is not finite: the input scans were
    0.13–0.16 CPU s per GB of input of linear's ~1.4 (benchmarks/linear_stages.py, 2026-12-01).
    tests/test_nonfinite_propagation.py checks the promise for every method that makes it."""
    vouching: Callable[..., VouchedMerge] | None = None
    """``function`` with what its pass proves (:class:`VouchedMerge`), called the same way: the engine merges
    with it and skips the NaN/Inf scan of the inputs where it vouches for them, scanning them after the merge
    where it does not (DELLA at 3 × 2 GB: those scans were 1.7–2.0 of 19–21 CPU s on one VM, 0.49–0.56
    of 13–15 on a faster one, 2026-12-05)."""
    topk_pass: TopKPass | None = None
    """The method's whole-tensor step, where it is only each model's magnitude-rank rule over its task
    vector (TIES' top-k, Breadcrumbs' band of ranks), so that with those rules computed over the whole
    tensor (``TensorInputs.topk``) any flat slice merges to exactly that slice of the merged tensor. The
    engine then streams large tensors in pieces, the rules found first (tests check the equality)."""
    scalar_pass: ScalarPass | None = None
    """The method's whole-tensor step, where it needs only a few numbers of the whole tensor (SLERP: its
    coefficients from two norms and a dot product) before an element-wise formula: the engine then
    streams large tensors in two passes, the scalar pass over flat ranges, then the merge piece by piece
    with its result in ``scalars`` (tests check the bytes against the whole-tensor merge)."""
    compiled: bool = False
    """Its arithmetic has a compiled loop (:mod:`mergelab.kernels`): the engine loads the loops on a thread of
    their own ahead of a large merge, so that no piece waits for them."""
    formula: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    also_in: tuple[str, ...] = ()
    """Other tools that have this method under this name or a documented equivalent (names from
    :data:`PEER_TOOLS`); empty when only mergelab has it. ``mergelab methods`` shows it as a column."""
    fixed: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Keywords this registration fixes (``dare_ties`` is ``dare_merge`` with ``consensus="sum"``)."""
    inputs: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Function parameters named otherwise than the input they take (slerp: ``{"v0": "base"}``)."""
    adapter: Adapter = field(init=False, repr=False, hash=False, compare=False)
    """Derived from the declarations when the method is made (:func:`derive_adapter`)."""
    scalar_adapter: Adapter | None = field(init=False, repr=False, hash=False, compare=False)
    """The scalar pass's adapter (its function gets ``source`` and the parameters it names), when it has one."""
    vouching_adapter: Adapter | None = field(init=False, repr=False, hash=False, compare=False)
    """The adapter of ``vouching``, when the method has one."""

    def __post_init__(self) -> None:
        unknown = set(self.also_in) - set(PEER_TOOLS)
        if unknown:
            raise ValueError(f"method '{self.name}': also_in names unknown tools {sorted(unknown)}; "
                             f"known: {list(PEER_TOOLS)}")
        object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "adapter", derive_adapter(self))
        object.__setattr__(self, "scalar_adapter", None if self.scalar_pass is None
                           else derive_adapter(self, self.scalar_pass.function))
        object.__setattr__(self, "vouching_adapter", None if self.vouching is None
                           else derive_adapter(self, self.vouching))

    @property
    def tools(self) -> str:
        """Which tools have the method, for tables: ``mergelab only`` or ``mergelab, mergekit, ...``."""
        return ", ".join(("mergelab", *self.also_in)) if self.also_in else "mergelab only"

    @property
    def global_params(self) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.scope == "global"}

    @property
    def model_params(self) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.scope == "model"}

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    for key in (method.name, *method.aliases):
        if key in _REGISTRY:
            raise KeyError(f"merge method '{key}' is registered twice")
        _REGISTRY[key] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method '{name}'; valid methods: {', '.join(list_methods())}") from None


def list_methods() -> list[str]:
    return sorted({m.name for m in _REGISTRY.values()})


def all_methods() -> list[MergeMethod]:
    return [get_method(n) for n in list_methods()]
