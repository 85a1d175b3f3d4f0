"""What reaches the terminal when something goes wrong: one paragraph and an exit code, never a traceback.

Every command of the CLI runs inside :class:`GuardedGroup`, so a new command gets this for free:

- a :class:`~mergelab.errors.MergeLabError` prints its message and exits with its ``exit_code``
  (2: usage or config mistake, 1: found at run time);
- Ctrl-C exits 130, SIGTERM/SIGHUP 128 + signal (mergelab.signals), after the cleanups have run;
- anything else (a bug, or a failure nobody anticipated) prints one paragraph naming the exception and
  asking for ``--debug``, which shows the traceback (so does ``MERGELAB_DEBUG=1``);
- warnings print as ``warning: ...`` lines, not as Python's ``file:line: UserWarning`` blocks;
- a reader that leaves our output (``mergelab merge --help | head``) stops the command quietly with exit 1.

User text (paths, tensor names, device names) goes through :func:`plain`: rich would otherwise read
``[red]`` as markup (and raise on ``[/x]``) and ``:smile:`` as an emoji code.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from mergelab.errors import MergeLabError
from mergelab.signals import Terminated, signals_raise

console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

DEBUG_ENV = "MERGELAB_DEBUG"


def plain(text: object) -> str:
    """``text`` made safe for rich markup: brackets escaped (emoji codes are off on our consoles)."""
    return escape(str(text))


def _one_paragraph(text: str) -> str:
    # a blank line would split the message in two paragraphs; keep lists as lines
    return "\n".join(line for line in text.strip().splitlines() if line.strip())


def _stop_behind(exc: BaseException) -> BaseException | None:
    """The signal's :class:`Terminated` or ``KeyboardInterrupt`` that ``exc`` was raised while unwinding from,
    if any: the exception a signal handler raises may land inside a lock's code, and the lock's ``__exit__``
    then fails in its place (a SIGHUP during `.ci/run`, 2026-12-05: "RuntimeError: cannot release un-acquired
    lock" reported as a bug, exit 1, where the merge had been stopped and cleaned up as asked)."""
    seen: set[int] = set()
    context = exc.__context__
    while context is not None and id(context) not in seen:
        if isinstance(context, (Terminated, KeyboardInterrupt)):
            return context
        seen.add(id(context))
        context = context.__context__
    return None


def describe(exc: BaseException) -> tuple[str, int]:
    """The message and exit code for an exception that reached the command line; one raised while a signal's
    stop unwound reports the stop (:func:`_stop_behind`)."""
    if not isinstance(exc, (Terminated, KeyboardInterrupt)) and (stop := _stop_behind(exc)) is not None:
        exc = stop
    if isinstance(exc, MergeLabError):
        return str(exc), exc.exit_code
    if isinstance(exc, Terminated):
        return (f"stopped by {exc}; the temporary files of this run were removed and no output was "
                "installed", exc.exit_code)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; the temporary files of this run were removed and no output was installed", 130
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return ("out of memory; close other programs, use a smaller --max-shard-size or fewer models at a "
                "time, or a machine with more memory", 1)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{what}; check the path and its permissions", 1
    if isinstance(exc, (ValueError, KeyError)):
        # commands raise these for bad values of their own options; str(KeyError('x')) would be "'x'"
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return msg, 2
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + detail if detail else ''}. This is a bug in mergelab: "
            f"run the command again with --debug for the traceback and report it", 1)


def print_error(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` as ``error: ...`` (the traceback first with ``debug``); returns the exit code."""
    message, code = describe(exc)
    if debug:
        err_console.print(plain("".join(traceback.format_exception(exc)).rstrip()), soft_wrap=True)
    err_console.print(f"[bold red]error:[/] {plain(_one_paragraph(message))}", soft_wrap=True)
    return code


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show warnings as ``warning: message`` lines, each distinct message once."""
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = str(message)
        if text not in seen:
            seen.add(text)
            err_console.print(f"[yellow]warning:[/] {plain(text)}", soft_wrap=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def debug_requested(ctx: typer.Context) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class GuardedGroup(TyperGroup):
    """The CLI's command group: runs the chosen command with signals raising and errors printed."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            with signals_raise(), warnings_as_lines():
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException, SystemExit):
            raise  # typer's own exits and usage errors (exit 2) print themselves
        except BrokenPipeError as exc:
            if exc.filename is not None:
                raise typer.Exit(print_error(exc, debug=debug_requested(ctx))) from None
            # whoever read our output left (`mergelab merge --help | head`): typer exits 1 without a word, as
            # click, git and coreutils do; "Broken pipe; check the path" would name no path of the user's
            raise
        except BaseException as exc:  # the one place that turns every error into a message
            raise typer.Exit(print_error(exc, debug=debug_requested(ctx))) from None
