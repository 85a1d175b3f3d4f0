"""The ``mergelab`` command line: parse arguments, call one function, print. Nothing else lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergelab.errors import MergeLabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Merge neural networks in weight space, compare with ensembles, explain why it works.")
console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    # str(KeyError("x")) is "'x'" (quoted): print the message itself.
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def merge(
    config: Annotated[Path, typer.Argument(help="YAML merge config (mergekit format for shared methods)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    device: Annotated[str, typer.Option(help="where the math runs: cpu, cuda, cuda:1")] = "cpu",
    max_shard_size: Annotated[
        str, typer.Option(help="largest output shard, in bytes or e.g. 2GB, 500MiB")] = "5GB",
    allow_nonfinite: Annotated[
        bool, typer.Option(help="merge tensors that contain NaN/Inf instead of refusing")] = False,
    no_hash: Annotated[
        bool, typer.Option("--no-hash", help="skip the sha256 of inputs in mergelab.json")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar")] = False,
    take_missing_from: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--take-missing-from", metavar="base",
        help="tensors some models lack (buffers such as position_ids): take them from the base")] = None,
    no_model_card: Annotated[
        bool, typer.Option("--no-model-card", help="do not write a model card README.md into OUT")] = False,
) -> None:
    """Merge the checkpoints described in CONFIG into OUT."""
    from mergelab.merge.allocator import recycle_freed_memory
    from mergelab.merge.engine import run_merge

    recycle_freed_memory()
    try:
        result = run_merge(config, out, overwrite=overwrite, device=device, max_shard_size=max_shard_size,
                           allow_nonfinite=allow_nonfinite, progress=not quiet, hash_inputs=not no_hash,
                           take_missing_from=take_missing_from, model_card=not no_model_card)
    except (MergeLabError, ValueError, KeyError) as exc:
        _fail(exc)
        return
    console.print(f"wrote {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) to {result.out_dir}")


@app.command("extract-lora")
def extract_lora(
    base: Annotated[str, typer.Argument(help="base model: folder, file or cached Hub id")],
    tuned: Annotated[str, typer.Argument(help="the fine-tune of BASE to express as a LoRA adapter")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (a PEFT adapter)")],
    rank: Annotated[int, typer.Option(help="LoRA rank r (clamped per matrix to its smaller side)")] = 16,
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="no progress bar")] = False,
) -> None:
    """Write a PEFT LoRA adapter from the truncated SVD of TUNED − BASE, loadable by peft."""
    from mergelab.lora_extract import extract_lora as run

    try:
        result = run(base, tuned, out, rank=rank, overwrite=overwrite, progress=not quiet)
    except (MergeLabError, ValueError, KeyError) as exc:
        _fail(exc)
        return
    worst = max((e["relative_error"] for e in result.errors.values()), default=0.0)
    console.print(f"wrote a rank-{rank} LoRA of {result.modules} modules to {result.out_dir} (largest relative "
                  f"error {worst:.3g}); {len(result.not_captured)} delta(s) LoRA cannot hold (biases, norms) are "
                  "listed in its mergelab.json")


@app.command()
def methods(
    name: Annotated[Optional[str], typer.Argument(help="show one method's parameters")] = None,  # noqa: UP045
) -> None:
    """List the merge methods with their parameters and papers."""
    from mergelab.methods import all_methods, get_method

    if name is not None:
        try:
            m = get_method(name)
        except KeyError as exc:
            _fail(exc)
            return
        console.print(f"[bold]{m.name}[/]: {escape(m.summary)}\n  formula: {escape(m.formula)}\n"
                      f"  paper: {escape(m.paper)}\n  base model: {m.base}\n  tools: {m.tools}")
        table = Table("parameter", "scope", "type", "default", "meaning")
        for p in m.params:
            default = "required" if p.required else repr(p.default)
            table.add_row(p.name, p.scope, p.kind.__name__, default, p.help)
        console.print(table)
        return
    table = Table("method", "base", "parameters", "tools", "paper")
    for m in all_methods():
        table.add_row(m.name, m.base, ", ".join(p.name for p in m.params), m.tools, m.paper)
    console.print(table)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        _fail(FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite"))


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="study name; `mergelab study --list` shows them")] = "",
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/study"),
    quick: Annotated[bool, typer.Option(help="reduced grid that runs in minutes")] = False,
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    suite: Annotated[Optional[str], typer.Option(help="task-vectors, task-vector-search: text or vision")] = None,  # noqa: UP045
    executor: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="rebasin, merge-search, task-vector-search, and zoo training: local (processes), local:N, ray, "
             "or ray:ADDRESS")] = None,
    overwrite: Annotated[bool, typer.Option(help="write into an existing, non-empty OUT")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the studies")] = False,
) -> None:
    """Run a study; writes CSV + Markdown tables, PNG plots and report.html into OUT."""
    from mergelab import studies

    if list_ or not name:
        for key, desc in studies.DESCRIPTIONS.items():
            console.print(f"[bold]{key}[/]: {desc}")
        return
    _refuse_existing(out, overwrite)
    options = {k: v for k, v in {"suite": suite, "executor": executor}.items() if v is not None}
    try:
        report = studies.run_study(name, out, quick=quick, seed=seed, **options)
    except (MergeLabError, ValueError, KeyError) as exc:
        _fail(exc)
        return
    console.print(f"report: {report}")


@app.command()
def search(
    config: Annotated[Path, typer.Argument(help="search YAML: a merge config + search space + evaluator")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/search"),
    generations: Annotated[Optional[int], typer.Option(help="override search.generations")] = None,  # noqa: UP045
    population: Annotated[Optional[int], typer.Option(help="override search.population")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="override search.seed")] = None,  # noqa: UP045
    executor: Annotated[str, typer.Option(help="local (processes), local:N, ray, or ray:ADDRESS")] = "local",
    overwrite: Annotated[bool, typer.Option(help="write into an existing, non-empty OUT")] = False,
) -> None:
    """CMA-ES search of per-layer merge coefficients; saves best_config.yaml that `mergelab merge` reproduces."""
    from mergelab.search.run import run_search

    _refuse_existing(out, overwrite)
    try:
        best = run_search(config, out, generations=generations, population=population, seed=seed,
                          executor=executor)
    except (MergeLabError, ValueError, KeyError, FileNotFoundError) as exc:
        _fail(exc)
        return
    console.print(f"best config: {best}  (scores per generation: {best.parent / 'scores.png'})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="seed of every random choice")] = 0,
    overwrite: Annotated[bool, typer.Option(help="write into an existing, non-empty OUT")] = False,
) -> None:
    """A few-minute run of the weight-averaging studies with an HTML report (the README's main job)."""
    from mergelab.studies.demo import run_demo

    _refuse_existing(out, overwrite)
    report = run_demo(out, seed=seed)
    console.print(f"report: {report}")


if __name__ == "__main__":
    app()
