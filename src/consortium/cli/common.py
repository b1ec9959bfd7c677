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
