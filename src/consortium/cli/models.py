"""``consortium models``: the model lifecycle (versions, canary evaluation, staged rollout, rollback, drift);
``consortium rollback`` is ``models rollback`` at the top level."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table as RichTable
from typer.exceptions import Exit

from consortium.cli.common import JsonOpt, err_console, fmt, out_console
from consortium.errors import ConfigError


models_app = typer.Typer(help="The model lifecycle: versions, canary evaluation, staged rollout, rollback, drift.")
VersionArg = Annotated[str, typer.Argument(metavar="VERSION", help="a model version, e.g. v2")]
RunArg = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a completed run held to an agreement with lifecycle terms")]


def _lineage(run_dir: Path) -> Any:
    """The run's model lineage as its transcript has it (verified); the registry index is brought up to date."""
    from consortium.lifecycle.registry import ModelRegistry
    from consortium.audit.verify import verify_run

    report = verify_run(run_dir)
    if report.lineage is None:
        raise ConfigError(
            f"{run_dir} has no model versions: a run registers its final model when its agreement sets lifecycle terms"
        )
    if report.registry_stale:
        ModelRegistry(run_dir).rebuild(report.lineage.registry.versions)
    return report.lineage


SimKeysOpt = Annotated[Path | None, typer.Option("--keys", help="a simulated run: the folder of every member's key file")]
KitOpt = Annotated[
    Path | None, typer.Option("--kit", help="a deployed run: the coordinator's kit; it serves, and the sites' agents join")
]
SchemaOpt = Annotated[Path | None, typer.Option("--schema", help="with --kit: the agreed data schema")]
SampleOpt = Annotated[Path | None, typer.Option(
    "--sample", help="with --kit, instead of --schema: examples in the sites' layout, read by the task's load")]
WaitOpt = Annotated[float, typer.Option("--wait-for-sites", min=1, help="with --kit: seconds to wait for every site's agent")]


@contextmanager
def _reopened(run_dir: Path, keys: Path | None, kit: Path | None, layout: tuple[Path | None, Path | None], wait: float,
              incoming: list[str] | None = None) -> Iterator[Any]:
    """The run reopened for the lifecycle: simulated (every member's key at hand) or by its deployed coordinator."""
    from consortium.run.lifecycle import open_lifecycle, read_incoming

    if (keys is None) == (kit is None):
        raise ConfigError(
            "pass --keys DIR (a simulated run: every member's key) or --kit KIT with --schema SCHEMA or --sample DIR (a deployed run: "
            "its coordinator serves, and each site joins with consortium join)"
        )
    if kit is None:
        assert keys is not None
        yield open_lifecycle(run_dir, keys, incoming=read_incoming(run_dir, incoming or []))
        return
    from consortium.deploy.provision import load_kit
    from consortium.deploy.serve import serve_lifecycle

    if incoming:
        raise ConfigError("--incoming names a simulated site's records: a deployed site reads its own (consortium join --incoming CSV)")
    schema, sample = layout
    with serve_lifecycle(load_kit(kit), run_dir, schema, sample=sample, wait_for_sites_s=wait) as lc:
        err_console.print(f"every site joined: {', '.join(lc.names)}")
        yield lc


@models_app.command("list")
def models_list(run_dir: RunArg, as_json: JsonOpt = False) -> None:
    """Every model version: its state, parent, round, metrics, privacy cost and the sites running it."""
    lineage = _lineage(run_dir)
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), **lineage.to_json()}) + "\n")
        return
    t = RichTable(title=f"model versions of {run_dir}")
    for col in ("version", "state", "parent", "round", "accuracy", "ECE", "max epsilon", "running on"):
        t.add_column(col, justify="left" if col in ("version", "state", "running on") else "right")
    for v in lineage.registry.versions.values():
        running = sorted(s for s, ver in lineage.deployed.items() if ver == v.id)
        eps = max(v.epsilon.values()) if v.epsilon else None
        t.add_row(
            v.id, v.state, v.parent or "-", str(v.round), fmt(v.metrics.get("accuracy")), fmt(v.metrics.get("ece")),
            fmt(eps), ", ".join(running) or "-",
        )
    out_console.print(t)
    for site, info in lineage.to_json()["open_drift_incidents"].items():
        out_console.print(f"[bold yellow]promotion paused[/]: {site} reported drift in {', '.join(info['features']) or 'its label rates'} (entry {info['entry']})")


@models_app.command("show")
def models_show(run_dir: RunArg, version: VersionArg, as_json: JsonOpt = False) -> None:
    """One version: its hash, lineage, every state change with its reason, its evaluations and deployments."""
    from dataclasses import asdict

    from consortium.audit.verify import read_entries

    lineage = _lineage(run_dir)
    v = lineage.registry.get(version)
    evaluations = [e.body | {"entry": e.index} for e in lineage.evaluations if version in (e.body["version"], e.body["baseline"])]
    deployments = [
        {"entry": e.index, "site": e.author, **{k: e.body[k] for k in ("reason", "stage", "accepted", "detail")}}
        for e in read_entries(run_dir) if e.kind == "deployment" and e.body["version"] == version
    ]
    shown = {
        **v.to_json(), "lineage": [x.id for x in lineage.registry.lineage(version)],
        "running_on": sorted(s for s, ver in lineage.deployed.items() if ver == version),
        "evaluations": evaluations, "deployments": deployments,
    }
    if as_json:
        sys.stdout.write(json.dumps(shown) + "\n")
        return
    out_console.print(f"[bold]{v.id}[/] {v.state}; lineage {' <- '.join(shown['lineage'])}; round {v.round}; sha256 {v.sha256[:16]}...")
    for change in v.history:
        c = asdict(change)
        out_console.print(f"  {c['at']} {c['previous'] or '-'} -> {c['state']} by {c['by']}: {c['reason']}", highlight=False)
    for ev in evaluations:
        verdict = "passed" if ev["passed"] else "FAILED"
        out_console.print(f"  {ev['purpose']} (stage {ev['stage']}) on {', '.join(ev['sites'])} against {ev['baseline'] or '-'}: {verdict}")
    out_console.print(f"  running on: {', '.join(shown['running_on']) or 'no site'}")


@models_app.command("register")
def models_register(
    run_dir: RunArg,
    model: Annotated[Path, typer.Option("--model", help="a .safetensors file with the run's layout and standardisation")],
    parent: Annotated[str, typer.Option("--parent", help="the version it was trained from")],
    by: Annotated[str, typer.Option("--by", help="the member who brings it in")] = "coordinator",
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, sample: SampleOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Register a model trained from a version (fine-tuned, say) as a new candidate."""
    from consortium.run.lifecycle import read_model_file

    tensors = read_model_file(model)
    with _reopened(run_dir, keys, kit, (schema, sample), wait) as lc:
        if lc.agreement.role_of(by) is None:
            raise ConfigError(f"'{by}' is not a member of the agreement: name the member who brings the model in")
        v = lc.register(tensors, parent=parent, by=by)
    out_console.print(f"registered {v.id} (candidate, parent {parent}): sha256 {v.sha256[:16]}...")


StagesOpt = Annotated[int | None, typer.Option("--stages", min=1, help="run only this many rollout stages now (default: all)")]


@models_app.command("promote")
def models_promote(
    run_dir: RunArg, version: VersionArg, stages: StagesOpt = None, as_json: JsonOpt = False,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, sample: SampleOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Canary evaluation, then production in the agreement's stages with monitoring after each.

    Exits 0 when the version ends in production, 1 when the canary rejects it or monitoring rolls it back.
    """
    with _reopened(run_dir, keys, kit, (schema, sample), wait) as lc, err_console.status(f"promoting {version}: canary evaluation"):
        promotion = lc.promote(version, stages=stages)
    _print_promotion(promotion, as_json)


@models_app.command("advance")
def models_advance(
    run_dir: RunArg, stages: StagesOpt = None, as_json: JsonOpt = False,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, sample: SampleOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Take the production version's rollout on from the stage it reached, with monitoring after each stage."""
    with _reopened(run_dir, keys, kit, (schema, sample), wait) as lc, err_console.status("advancing the rollout"):
        promotion = lc.advance(stages=stages)
    _print_promotion(promotion, as_json)


def _print_promotion(promotion: Any, as_json: bool) -> None:
    from consortium.lifecycle.lineage import describe_failures

    version = promotion.version
    if as_json:
        sys.stdout.write(json.dumps(promotion.to_json()) + "\n")
    elif promotion.outcome == "rejected":
        err_console.print(f"[bold red]rejected at canary[/]: {version} {describe_failures(promotion.failed)}; it is retired", highlight=False)
    else:
        for stage in promotion.stages:
            watch = stage.get("monitoring")
            watch = watch if isinstance(watch, str) else ("passed" if watch["passed"] else "FAILED: " + describe_failures(watch["failed"]))
            refused = [f"{s} {a}" for s, a in stage["answers"].items() if a != "deployed"]
            out_console.print(
                f"stage {stage['stage']} ({stage['share']:.0%}): running on {', '.join(stage['running'])}"
                + (f"; {'; '.join(refused)}" if refused else "") + f"; monitoring {watch}", highlight=False,
            )
        if promotion.rolled_back:
            err_console.print(f"[bold red]rolled back[/]: {version} regressed during the rollout; {promotion.baseline} is back everywhere")
        elif promotion.held_after is not None:
            out_console.print(f"[bold green]{version} is in production[/], rolled out to stage {promotion.held_after}: "
                              "consortium models advance takes it on")
        else:
            out_console.print(f"[bold green]{version} is in production[/] on every stage")
    if promotion.outcome != "production":
        raise Exit(1)


ToOpt = Annotated[str, typer.Option("--to", help="the earlier production version to restore")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why: it goes in the transcript for every member to read")]
MemberOpt = Annotated[str, typer.Option("--member", help="who demands it: a coordinator, site or auditor (signs it)")]


@models_app.command("rollback")
def models_rollback(
    run_dir: RunArg, to: ToOpt, reason: ReasonOpt, member: MemberOpt = "coordinator",
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, sample: SampleOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Restore an earlier production version everywhere, signed by the member who demands it."""
    from consortium.governance.agreement import load_member_key

    if kit is not None and member != "coordinator":
        raise ConfigError("the deployed coordinator signs only its own demands: a site or auditor halts the run (consortium halt)")
    with _reopened(run_dir, keys, kit, (schema, sample), wait) as lc:
        if lc.agreement.role_of(member) is None:
            raise ConfigError(f"'{member}' is not a member of the agreement: name the member who demands the rollback")
        key = load_member_key(lc.agreement, keys, member) if keys is not None else None
        answers = lc.rollback(to, reason=reason, member=member, key=key)
    refused = [f"{s} ({a})" for s, a in answers.items() if a != "deployed"]
    out_console.print(
        f"[bold yellow]rolled back[/] to {to} by {member}: {reason.strip()}; restored on {len(answers) - len(refused)} site(s)"
        + (f", not on {', '.join(refused)}" if refused else ""), highlight=False,
    )


@models_app.command("monitor")
def models_monitor(
    run_dir: RunArg,
    incoming: Annotated[
        list[str] | None, typer.Option("--incoming", help="SITE=FILE.csv: the records that reached a simulated site since training (repeatable)")
    ] = None,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, sample: SampleOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Each site checks its incoming records for drift against its training records; breaches become signed incidents."""
    with _reopened(run_dir, keys, kit, (schema, sample), wait, incoming) as lc:
        reports = lc.monitor()
    for e in reports:
        if e.kind == "drift_incident":
            what = ", ".join(e.body["features"]) or "none"
            out_console.print(
                f"[bold red]drift incident[/] filed by {e.author} (entry {e.index}): features {what}; "
                f"label shift {e.body['label_shift']:.3f}; promotion is paused", highlight=False,
            )
        else:
            out_console.print(f"[bold green]resolved[/]: {e.author}'s incoming data no longer drifts (entry {e.index})")
    if not reports:
        out_console.print("no drift to report: every site's check is within the agreement's thresholds (or kept at the site)")
