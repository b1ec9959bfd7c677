"""Run every benchmark in this folder and print its table (``make bench``)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def main() -> None:
    here = pathlib.Path(__file__).parent
    console = Console(width=160)
    for path in sorted(here.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        table = Table(title=f"{path.stem}: {(module.__doc__ or '').strip().splitlines()[0]}")
        for col in ("measure", "value", "ratio to baseline"):
            table.add_column(col, justify="left" if col == "measure" else "right")
        for name, value, ratio in module.main():
            table.add_row(escape(name), f"{value:.4g}" if isinstance(value, float) else escape(str(value)), escape(ratio))
        console.print(table)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
