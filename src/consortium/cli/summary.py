"""What a training run prints: a progress bar on stderr, then the summary (a table, or one JSON object),
its warnings, and the halt line with exit code HALTED_EXIT when an incident halted it."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable
from typer.exceptions import Exit

from consortium.cli.common import HALTED_EXIT, LONG_TABLE, err_console, fmt, out_console, spread


def train(run: Any, rounds: int, as_json: bool, before: tuple[str, ...] = ()) -> None:
    """Run with a progress bar on stderr, then print the summary; a halted run exits with HALTED_EXIT.
    ``before``: warnings known before training (the plan's), printed first and not again after."""
    for warning in before:
        err_console.print(f"[bold red]WARNING[/] (before training): {warning}", highlight=False)
    show_progress = not as_json or err_console.is_terminal
    with Progress(
        TextColumn("[bold]training[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds  {task.fields[metric]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show_progress,
        transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=rounds, metric="")

        def on_round(record: Any) -> None:  # the task's headline metric: accuracy, or a regression's MSE
            name = "accuracy" if "accuracy" in record.metrics else "mse"
            value = record.metrics.get(name)
            progress.update(task, advance=1, metric=f"{name} {'-' if value is None else f'{value:.4g}'}")

        result = run(on_round=on_round)
    summary = result.summary
    for warning in (w for w in summary["warnings"] if w not in before):
        err_console.print(f"[bold red]WARNING[/]: {warning}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    else:
        print_summary(summary)
    halt = summary.get("halt")
    if halt is not None:
        where = f" (site {halt['site']})" if halt.get("site") else ""
        err_console.print(
            f"[bold red]RUN HALTED[/] in round {halt['round']}: {halt['cause']}{where}: {halt['detail']}. "
            f"Nothing more runs until a quorum of approvers resumes it: consortium resume {summary['run_dir']} --keys DIR "
            "--approver NAME ...",
            highlight=False, soft_wrap=True,
        )
        raise Exit(HALTED_EXIT)


#: The columns of the results table, by the task's target.
COLUMNS = {"classification": ("accuracy", "loss", "auc"), "regression": ("mse", "mae", "r2")}


def print_summary(s: dict[str, Any]) -> None:
    task = s.get("task") or {"name": "classification", "target": "classification", "headline": "accuracy"}
    columns, headline = COLUMNS[task["target"]], task["headline"]
    t = RichTable(title=f"{s['dataset']} ({task['name']}): {s['sites']} sites, {s['rounds']} rounds (scored on every site's test split)")
    t.add_column("training")
    for col in columns:
        t.add_column(col, justify="right")
    fed = s["federated"]
    t.add_row("[bold]federated (consortium)[/]", *(fmt(fed.get(c)) for c in columns))
    if "local_only" in s:
        lo = s["local_only"]
        t.add_row("local-only, mean of sites", fmt(lo[f"{headline}_mean"]), "", "")
        per_site = lo[f"{headline}_per_site"]
        if len(per_site) > LONG_TABLE:  # 200 sites are read as a spread and the worst, not 200 rows
            for label, value, _ in spread(per_site, worst="high" if headline == "mse" else "low"):
                t.add_row(f"  sites alone, {label}", fmt(value), "", "")
            t.add_row(f"  [dim]every one of the {len(per_site)} sites: summary.json, local_only[/]", "", "", "")
        else:
            for name, value in per_site.items():
                own = lo[f"own_split_{headline}_per_site"][name]
                t.add_row(f"  {name} alone (own split {fmt(own)})", fmt(value), "", "")
    if "pooled" in s:
        p = s["pooled"]
        t.add_row("pooled (simulation-only upper bound)", *(fmt(p.get(c)) for c in columns))
    if task["target"] == "classification" and fed.get("majority_accuracy") is not None:
        t.add_row("[dim]constant: the majority class[/]", fmt(fed["majority_accuracy"]), fmt(fed.get("constant_loss")), "0.5")
    elif fed.get("mean_mse") is not None:
        t.add_row("[dim]constant: the mean[/]", fmt(fed["mean_mse"]), "", "0")
    out_console.print(t)
    quality = [f"expected calibration error {fed['ece']:.3f}"] if fed.get("ece") is not None else []
    if fed.get("site_accuracy_std") is not None:
        quality.append(f"accuracy across sites {fed['site_accuracy_mean']:.3f} +- {fed['site_accuracy_std']:.3f} (from sums)")
    for key, label in (("demographic_parity_gap", "demographic parity gap"), ("equalized_odds_gap", "equalised odds gap"),
                       ("shift_accuracy", "accuracy under the declared shift")):
        if fed.get(key) is not None:
            quality.append(f"{label} {fed[key]:.3f}")
    if quality:
        out_console.print("beyond accuracy: " + "; ".join(quality))
    sa = s["secure_aggregation"]
    if sa["enabled"]:
        per_round = sa["survivors_per_round"]
        out_console.print(
            f"secure aggregation: on ({sa['graph']} graph, threshold {sa['threshold']}, "
            f"{min(per_round, default=0)}-{max(per_round, default=0)} sites summed per round); "
            "the coordinator saw sums only"
        )
    else:
        out_console.print("[bold red]secure aggregation: OFF[/] (the coordinator saw every site's update)")
    pv = s["privacy"]
    if pv["enabled"]:
        # What a site may have spent, rounds whose answer was lost included: never below any ledger.
        spent = max((pv.get("epsilon_bound_per_site") or pv["epsilon_per_site"]).values(), default=0.0)
        if pv["level"] == "record":
            how = (
                f"record level, DP-SGD (noise multiplier {pv['noise_multiplier']:.3f}, clip {pv['clip']:g}, "
                f"sampling rate {pv['sampling_rate']:g})"
            )
        else:
            where = "added by the sites inside secure aggregation" if pv["noise"] == "distributed" else "[bold red]added by the coordinator[/]"
            how = (
                f"site level, DP-FedAvg ({pv['noise']} noise {where}, multiplier {pv['noise_multiplier']:.3f} "
                f"for {pv['cohort']} honest sites, update clip {pv['clip']:g}{', adaptive' if pv['adaptive_clipping'] else ''})"
            )
        out_console.print(
            f"differential privacy: {how}; epsilon spent per site up to {spent:.3f} of {pv['target_epsilon']:g} "
            f"at delta {pv['delta']:g} ({pv['accountant']})" + ("; local-only and pooled rows are NOT private" if "pooled" in s or "local_only" in s else "")
        )
        if pv["refusals"]:
            out_console.print(f"rounds refused for lack of budget: {pv['refusals']}")
    else:
        out_console.print("[bold red]differential privacy: OFF[/] (no formal guarantee for any record)")
    skipped = fed.get("rounds_skipped", 0)
    if skipped:
        out_console.print(f"{skipped} round(s) skipped for lack of answers: see metrics.jsonl")
    tr = s.get("transcript")
    if tr:
        out_console.print(
            f"transcript: {tr['entries']} signed entries, tree head {tr['tree_head']['root'][:16]}... co-signed by "
            f"{len(tr['tree_head']['cosigners'])} of {s['sites']} sites, {'verified' if tr['verified'] else 'NOT verified'} "
            f"(check it yourself: consortium verify {s['run_dir']})"
        )
    out_console.print(f"run folder: {s['run_dir']}")
