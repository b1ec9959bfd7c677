"""``consortium schema``: a site's data schema; ``schema infer`` drafts one from a CSV for a person to check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from consortium.cli.common import err_console, out_console
from consortium.errors import ConfigError


schema_app = typer.Typer(
    no_args_is_help=True,
    help="A site's data schema (docs/schema.md): draft one from a CSV, check it, agree it with the other sites.",
)


@schema_app.command("infer")
def schema_infer(
    csv_path: Annotated[Path, typer.Argument(metavar="CSV", help="the site's data: a UTF-8 CSV with a header row")],
    label: Annotated[str | None, typer.Option("--label", help="the label column (default: the last column)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the schema here (default: print it)")] = None,
) -> None:
    """Draft a schema from CSV: a type per column, category values, missing: impute where cells are missing.

    The draft loads with the CSV as it is; check every column, add bounds, then agree it with the other sites.
    """
    from consortium.data.infer import infer_schema
    from consortium.runs import write_atomic

    if out is not None and out.exists():
        raise ConfigError(f"{out} already exists: edit it, or remove it first")
    draft = infer_schema(csv_path, label)
    schema = draft.schema
    target = "a regression target" if schema.is_regression else f"{len(schema.classes())} classes"
    what = (f"{len(schema.columns)} columns from {draft.rows} rows, label '{schema.label}' ({target}), "
            f"{len(schema.feature_names())} features")
    if out is None:
        sys.stdout.write(draft.text)
        err_console.print(f"drafted {what}: check it, then save it as the site's schema", highlight=False, soft_wrap=True)
        return
    write_atomic(out, draft.text.encode("utf-8"))
    out_console.print(f"wrote {out}: {what}; check every column before sharing it", highlight=False, soft_wrap=True)
