"""The ``consortium`` command.

Every error a user can cause ends as one line on stderr naming the problem
and the fix, exit code 2, and no traceback. ``--json`` prints exactly one
JSON object on stdout; progress and warnings go to stderr.

One module per command group; this one builds the app from them, in the order
``consortium --help`` lists the commands:

- ``run``: demo, simulate, show, halt, resume (``summary`` prints what a run trains)
- ``privacy``: privacy epsilon, privacy calibrate
- ``audit``: budget, verify, audit, report
- ``agreement``: agreement, key, policy
- ``deploy``: init, serve, dashboard-link, join
- ``models``: models, and rollback at the top level
- ``schema``: schema infer (draft a site's data schema from its CSV)
- ``task``: task hash, approve, list (a study's code, pinned by hash, approved by each site)
- ``common``: the consoles, shared options and the error handler

Commands import heavy modules (torch and the like) inside the function, so
``consortium --help`` and the light commands answer without loading them.
"""

from __future__ import annotations

import typer

from consortium.cli import agreement, audit, deploy, models, privacy, run, schema, task
from consortium.cli.common import HALTED_EXIT, err_console, out_console, run_app

__all__ = ["HALTED_EXIT", "app", "err_console", "main", "out_console"]

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Consortium: train one model across institutions that never reveal their raw data.",
)

app.command()(run.demo)
app.command()(run.simulate)
app.add_typer(privacy.privacy_app, name="privacy")
app.command()(audit.budget)
app.command()(audit.verify)
app.add_typer(agreement.agreement_app, name="agreement")
app.add_typer(agreement.key_app, name="key")
app.add_typer(agreement.policy_app, name="policy")
app.command()(deploy.init)
app.command()(deploy.serve)
app.command("dashboard-link")(deploy.dashboard_link)
app.command()(deploy.join)
app.command()(run.show)
app.command()(run.halt)
app.command()(run.resume)
app.command()(audit.audit)
app.command()(audit.report)
app.add_typer(models.models_app, name="models")
app.command("rollback")(models.models_rollback)  # consortium rollback: the same command, at the top level
app.add_typer(schema.schema_app, name="schema")
app.add_typer(task.task_app, name="task")


def main(argv: list[str] | None = None) -> None:
    """Entry point: turns every expected failure into one line and exit code 2."""
    run_app(app, argv)
