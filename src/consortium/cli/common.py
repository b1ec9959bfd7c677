"""What every command group shares: the two consoles, the ``--json`` option, the number format, the exit
code of a halted run, and the handler that turns every expected failure into one line and exit code 2.

Nothing here imports a heavy module (torch and the like): ``consortium --help`` and the light commands
answer without loading them.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.exceptions import Abort, Exit, TyperException

from consortium.errors import ConsortiumError

out_console = Console()
err_console = Console(stderr=True)

#: The exit code of a run that halted on an incident (2 is a usage or input error).
HALTED_EXIT = 3

JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


#: A per-site table longer than this is summarised on the console (the run folder keeps every row).
LONG_TABLE = 12


def spread(values: dict[str, float], *, worst: str, shown: int = 3) -> list[tuple[str, float, str | None]]:
    """A long per-site list as (label, value, site) rows: the ``shown`` worst sites (``worst``: "low" or
    "high"), then the 10th, 50th and 90th percentiles (site None) and the best, worst first."""
    import numpy as np

    ranked = sorted(values.items(), key=lambda kv: kv[1], reverse=worst == "high")
    rows: list[tuple[str, float, str | None]] = [(f"worst: {name}", value, name) for name, value in ranked[:shown]]
    percentiles = zip((10, 50, 90), np.quantile(np.array(list(values.values()), dtype=np.float64), [0.1, 0.5, 0.9]))
    middle = [(f"{q}th percentile", float(v), None) for q, v in percentiles]
    rows += middle if worst == "low" else middle[::-1]
    rows.append((f"best: {ranked[-1][0]}", ranked[-1][1], ranked[-1][0]))
    return rows


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run ``app``, turning every expected failure into one line on stderr and exit code 2 (no traceback)."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="consortium")
        if isinstance(code, int) and code:  # without standalone mode, click returns an Exit's code
            sys.exit(code)
    except ConsortiumError as exc:
        err_console.print(f"[bold red]error[/]: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: unknown option, a value of the wrong type or range
        if not exc.format_message():
            sys.exit(2)  # no arguments at all: the help was shown
        ctx = getattr(exc, "ctx", None)
        command = f"{ctx.command_path} --help" if ctx is not None else "consortium --help"
        err_console.print(f"[bold red]error[/]: {exc.format_message()} (see: {command})", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
