"""The ``mergelab`` command line: parse arguments, call one function, print. Nothing else lives here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from mergelab.imports import collector_paused, no_blas_workers, no_collection_at_exit, run_command, skip_teardown
from mergelab.terminal import GuardedGroup, console, err_console, plain


def _flags_untyped(params: list[Any]) -> list[Any]:
    # Typer labels every option with its type, flags included (`--help <bool>`); a flag takes no value.
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_untyped(super().get_params(ctx))


class _Group(GuardedGroup):  # the one place every exception becomes one error paragraph (mergelab.terminal)
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_untyped(super().get_params(ctx))


app = typer.Typer(cls=_Group, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Merge neural networks in weight space, compare with ensembles, explain why it works.")
log = logging.getLogger("mergelab")

Verbose = Annotated[int, typer.Option("-v", "--verbose", count=True, metavar="", show_default=False,
                                      help="more log messages (-vv: debug)")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="only errors: no progress bar, no notes")]


def _flag(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help)


def _logging(verbose: int, quiet: bool) -> None:
    """-q: errors only; default: warnings (notes such as tensors taken from the base); -v: info; -vv: debug."""
    from rich.logging import RichHandler

    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    log.setLevel(level)


def _show_version(value: bool) -> None:
    if value:
        from mergelab import __version__

        console.print(f"mergelab {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (also MERGELAB_DEBUG=1)")]
    = False,
) -> None:
    """Merge neural networks in weight space, compare with ensembles, explain why it works."""
    no_collection_at_exit()


@app.command(cls=_Command)
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config (mergekit format for shared methods)")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="output folder (not needed with --dry-run)")  # noqa: UP045
                   ] = None,
    overwrite: Annotated[bool, _flag("replace OUT if it exists")] = False,
    device: Annotated[str, typer.Option(help="where the math runs: cpu, cuda, cuda:1")] = "cpu",
    max_shard_size: Annotated[
        str, typer.Option(help="largest output shard, in bytes or e.g. 2GB, 500MiB")] = "5GB",
    allow_nonfinite: Annotated[bool, _flag("merge tensors that contain NaN/Inf instead of refusing")] = False,
    no_hash: Annotated[bool, _flag("skip the digests of inputs in mergelab.json", "--no-hash")] = False,
    digest: Annotated[str, typer.Option(
        "--hash", metavar="blake3|sha256",
        help="algorithm of the inputs' digests in mergelab.json: blake3 (a quarter of sha256's CPU) or sha256 "
             "(what the Hugging Face Hub shows as a weight file's LFS oid)")] = "blake3",
    take_missing_from: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--take-missing-from", metavar="base",
        help="tensors some models lack (buffers such as position_ids): take them from the base")] = None,
    no_model_card: Annotated[bool, _flag("do not write a model card README.md into OUT", "--no-model-card")] = False,
    dry_run: Annotated[bool, _flag("check the config and print the plan (tensors, shards, size, estimated "
                                   "memory and time); write nothing", "--dry-run")] = False,
    evaluate: Annotated[bool, _flag("after merging, run `mergelab eval OUT` (exit 1 if it fails)", "--eval")
                        ] = False,
    intermediate_dir: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--intermediate-dir", help="multi-stage configs: keep each named stage's output in DIR/NAME (default: a "
                                   "temporary folder beside OUT, removed afterwards)")] = None,
    diagnostics: Annotated[bool, _flag("also write per-layer SVD diagnostics of the task vectors (singular task "
                                       "interference, subspace alignment ratio) to OUT/diagnostics: CSV and PNG; "
                                       "needs a base_model", "--diagnostics")] = False,
    direct_io: Annotated[bool, _flag("write the weights with O_DIRECT, around the page cache (same bytes; faster "
                                     "on VMs that give free memory back to their host, and keeps the inputs "
                                     "cached in merges larger than free memory; buffered where the file "
                                     "system refuses it)", "--direct-io")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Merge the checkpoints described in CONFIG into OUT."""
    _logging(verbose, quiet)
    if dry_run:
        with collector_paused():
            from mergelab.merge.dry_run import summarize_merge

        summary = summarize_merge(config, max_shard_size=max_shard_size, take_missing_from=take_missing_from)
        table = Table("plan", "", show_header=False)
        for key, value in summary.rows():
            table.add_row(key, escape(value))
        console.print(table)
        return
    if out is None:
        raise ValueError("missing option '-o' / '--out': the folder to write the merged model to")
    from mergelab.io.file_hashes import digest_algorithm
    from mergelab.merge.allocator import recycle_freed_memory
    from mergelab.merge.inputs import config_input_files, digests_started

    try:
        algorithm = digest_algorithm(digest)
    except ValueError as exc:
        raise ValueError(f"--hash {digest}: {exc}") from None

    # before the digests' threads allocate: each got an arena of its own, which the merge's threads then also
    # used and kept the high water of (malloc_stats after a SLERP merge at 3 x 0.5 GB: arenas of 138, 66 and
    # 46 MB holding 90, 0.1 and 0 MB, against one of 289 MB). `mergelab merge` at 3 x 0.5 GB, every input
    # hashed, alternated: SLERP peak 500-563 -> 421-448 MiB, Model Stock 560-606 -> 510-537, TIES 605-625 ->
    # 586-602, linear unchanged; wall time unchanged (2026-12-05)
    recycle_freed_memory()
    no_blas_workers()  # before any thread starts
    # the inputs' digests start on the second core while the first imports torch (merge/inputs.py)
    with digests_started([] if no_hash else config_input_files(config), algorithm):
        with collector_paused():
            from mergelab.merge.engine import run_merge

        observer = None
        if diagnostics:
            from mergelab.report.layer_diagnostics import LayerDiagnosticsWriter

            observer = LayerDiagnosticsWriter()
        result = run_merge(config, out, overwrite=overwrite, device=device, max_shard_size=max_shard_size,
                           allow_nonfinite=allow_nonfinite, progress=not quiet, hash_inputs=not no_hash,
                           digest=algorithm, take_missing_from=take_missing_from, model_card=not no_model_card,
                           intermediate_dir=intermediate_dir, observer=observer, direct_io=direct_io)
    console.print(f"wrote {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) to {plain(result.out_dir)}",
                  soft_wrap=True)
    if diagnostics:
        _print_diagnostics(result.out_dir, result.record["diagnostics"])
    if evaluate:
        _evaluate(result.out_dir)
    else:  # all written and installed: the process may end without the interpreter's teardown (mergelab/imports.py)
        from mergelab.io.file_hashes import DIGESTS

        DIGESTS.drain()
        skip_teardown()


def _print_diagnostics(out: Path, record: dict[str, Any]) -> None:
    skipped = "; ".join(f"{n} skipped ({why})" for why, n in record["skipped"].items())
    if record["matrices"]:
        console.print(f"diagnostics of {record['matrices']} weight matrices: {plain(out / record['csv'])}, "
                      f"{plain(out / record['plot'])}" + (f"; {skipped}" if skipped else ""), soft_wrap=True)
    else:
        console.print(f"diagnostics: no weight matrix measured ({skipped or 'the merge has no 2-D weights'})",
                      soft_wrap=True)


@app.command("extract-lora", cls=_Command)
def extract_lora(
    base: Annotated[str, typer.Argument(help="base model: folder, file or cached Hub id")],
    tuned: Annotated[str, typer.Argument(help="the fine-tune of BASE to express as a LoRA adapter")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (a PEFT adapter)")],
    rank: Annotated[int, typer.Option(help="LoRA rank r (clamped per matrix to its smaller side)")] = 16,
    overwrite: Annotated[bool, _flag("replace OUT if it exists")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Write a PEFT LoRA adapter from the truncated SVD of TUNED − BASE, loadable by peft."""
    _logging(verbose, quiet)
    from mergelab.lora_extract import extract_lora as run

    result = run(base, tuned, out, rank=rank, overwrite=overwrite, progress=not quiet)
    worst = max((e["relative_error"] for e in result.errors.values()), default=0.0)
    console.print(f"wrote a rank-{rank} LoRA of {result.modules} modules to {plain(result.out_dir)} (largest relative "
                  f"error {worst:.3g}); {len(result.not_captured)} delta(s) LoRA cannot hold (biases, norms) are "
                  "listed in its mergelab.json")


def _evaluate(out: Path) -> None:
    from mergelab.sanity_eval import evaluate_merge

    report = evaluate_merge(out)
    what = "perplexity on the bundled text" if report.kind == "perplexity" else "mean cosine with the merged model"
    table = Table("model", what)
    if report.kind == "perplexity":
        table.add_row("merged", f"{report.merged:.4g}")
    for label, value in report.inputs.items():
        table.add_row(escape(label), f"{value:.4g}")
    console.print(table)
    for note in report.notes:
        log.warning(note)
    console.print(("[green]ok[/]: " if report.ok else "[bold red]failed[/]: ") + escape(report.verdict))
    if not report.ok:
        raise typer.Exit(code=1)


@app.command("eval", cls=_Command)
def eval_(
    out: Annotated[Path, typer.Argument(help="a folder written by `mergelab merge`")],
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Sanity-check a merged model against its inputs: perplexity (causal LMs) or embedding agreement."""
    _logging(verbose, quiet)
    _evaluate(out)


@app.command("example-models", cls=_Command)
def example_models(
    folder: Annotated[Path, typer.Argument(help="where to write base/, ft-a/, ft-b/, ft-c/ and *.yml")],
    seed: Annotated[int, typer.Option(help="seed of the weights and the fine-tunes' noise")] = 0,
    overwrite: Annotated[bool, _flag("replace existing base/, ft-a/... and example configs")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Write a tiny base model, three fine-tunes and the example configs (examples/) that run on them."""
    from mergelab.example_models import write_example_models

    _logging(verbose, quiet)
    paths = write_example_models(folder, seed=seed, overwrite=overwrite)
    console.print(f"wrote {plain(', '.join(p.name for p in paths))} and the example configs under {plain(folder)}; "
                  f"try: mergelab merge {plain(folder / 'ties.yml')} -o merged --eval", soft_wrap=True)


@app.command(cls=_Command)
def methods(
    name: Annotated[Optional[str], typer.Argument(help="show one method's parameters")] = None,  # noqa: UP045
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """List the merge methods with their parameters and papers."""
    _logging(verbose, quiet)
    from mergelab.method_catalog import find_method, load_catalog  # not the registry: it imports torch

    catalog = load_catalog()
    if name is not None:
        m = find_method(name, catalog)
        console.print(f"[bold]{m.name}[/]: {escape(m.summary)}\n  formula: {escape(m.formula)}\n"
                      f"  paper: {escape(m.paper)}\n  base model: {m.base}\n  tools: {m.tools}")
        table = Table("parameter", "scope", "type", "default", "meaning")
        for p in m.params:
            table.add_row(p.name, p.scope, p.kind, p.default, p.help)
        console.print(table)
        return
    table = Table("method", "base", "parameters", "tools", "paper")
    for m in catalog:
        table.add_row(m.name, m.base, ", ".join(p.name for p in m.params), m.tools, m.paper)
    console.print(table)


@app.command(cls=_Command)
def study(
    name: Annotated[str, typer.Argument(help="study name; `mergelab study --list` shows them")] = "",
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/study"),
    quick: Annotated[bool, _flag("reduced grid that runs in minutes")] = False,
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    suite: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="task-vectors, task-vector-search: text or vision (default: vision)")] = None,
    executor: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="rebasin, merge-search, task-vector-search, and zoo training: local (processes), local:N, ray, "
             "or ray:ADDRESS")] = None,
    overwrite: Annotated[bool, _flag("write into an existing, non-empty OUT")] = False,
    list_: Annotated[bool, _flag("list the studies", "--list")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """Run a study; writes CSV + Markdown tables, PNG plots and report.html into OUT."""
    _logging(verbose, quiet)
    from mergelab import studies

    if list_ or not name:
        for key, desc in studies.DESCRIPTIONS.items():
            console.print(f"[bold]{key}[/]: {desc}")
        return
    options = {k: v for k, v in {"suite": suite, "executor": executor}.items() if v is not None}
    report = studies.run_study(name, out, quick=quick, seed=seed, overwrite=overwrite, **options)
    console.print(f"report: {plain(report)}")


@app.command(cls=_Command)
def search(
    config: Annotated[Path, typer.Argument(help="search YAML: a merge config + search space + evaluator")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/search"),
    generations: Annotated[Optional[int], typer.Option(help="override search.generations")] = None,  # noqa: UP045
    population: Annotated[Optional[int], typer.Option(help="override search.population")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="override search.seed")] = None,  # noqa: UP045
    executor: Annotated[str, typer.Option(help="local (processes), local:N, ray, or ray:ADDRESS")] = "local",
    overwrite: Annotated[bool, _flag("write into an existing, non-empty OUT")] = False,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """CMA-ES search of per-layer merge coefficients; saves best_config.yaml that `mergelab merge` reproduces."""
    _logging(verbose, quiet)
    from mergelab.search.run import run_search

    best = run_search(config, out, generations=generations, population=population, seed=seed,
                      executor=executor, overwrite=overwrite)
    console.print(f"best config: {plain(best)}  (scores per generation: {plain(best.parent / 'scores.png')})")


@app.command(cls=_Command)
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    overwrite: Annotated[bool, _flag("write into an existing, non-empty OUT")] = False,
    runs: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="folder with runs of the studies (`mergelab study NAME --out RUNS/NAME`): the claims table links "
             "them and shows their verdicts")] = None,
    verbose: Verbose = 0,
    quiet: Quiet = False,
) -> None:
    """A few-minute run of the weight-averaging studies with an HTML report (the README's main job)."""
    _logging(verbose, quiet)
    from mergelab.studies.demo import run_demo

    report = run_demo(out, seed=seed, overwrite=overwrite, runs=runs)
    console.print(f"report: {plain(report)}")


def run() -> None:
    """The console script ``mergelab`` (and ``python -m mergelab``): the app, ended as :func:`run_command` says."""
    run_command(lambda: app(prog_name="mergelab"))


if __name__ == "__main__":
    run()
