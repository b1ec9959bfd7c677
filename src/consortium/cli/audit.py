"""Checking a run after the fact: ``verify``, ``budget`` (the sites' ledgers), ``audit`` (the red team)
and ``report`` (one HTML page)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table as RichTable
from typer.exceptions import Exit

from consortium.cli.common import LONG_TABLE, JsonOpt, err_console, out_console, spread
from consortium.runs import require_run_folder


StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="a site's state folder: its ledger, and its own record of the heads it co-signed"),
]


def _reconciled(run_dir: Path, state: Path | None) -> tuple[dict[str, Any], str | None]:
    """The ledgers (the run's own, or the one in ``state``) reconciled with the decisions each site signed in
    the run's transcript, when the transcript verifies; otherwise the ledgers alone and why."""
    from consortium.errors import VerificationError
    from consortium.privacy.ledger import read_ledgers
    from consortium.transcript.site_record import transcript_payments
    from consortium.audit.verify import read_entries, verify_run

    paths = None if state is None else [state / "budget.sqlite"]
    try:
        verify_run(run_dir)
    except VerificationError as exc:
        return read_ledgers(run_dir, paths=paths), f"the transcript does not verify ({exc}): the ledgers are not reconciled with it"
    entries = read_entries(run_dir)
    sites = [n for n, m in (entries[0].body.get("members") or {}).items() if m.get("role") == "site"]
    return read_ledgers(run_dir, paths=paths, signed={s: transcript_payments(entries, s) for s in sites}), None


def _print_discrepancies(rows: dict[str, Any]) -> bool:
    """Name each ledger row that disagrees with what its site signed; whether any row was deleted or edited."""
    broken = False
    for site, r in rows.items():
        for d in r.get("discrepancies", []):
            broken |= d["kind"] != "unsigned"
            line = f"{site}: run {d['run'][:12]} round {d['round']}: {d['detail']}"
            err_console.print(("[bold red]ledger[/] " if d["kind"] != "unsigned" else "note: ") + line, highlight=False, soft_wrap=True)
    return broken


def budget(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    state: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Epsilon spent by each site against its own cap, read from the sites' ledgers and reconciled with the
    privacy events each site signed in the transcript. Exits 1 when a ledger row was deleted or edited."""
    require_run_folder(run_dir)  # before the heavy imports: a wrong path is said at once
    rows, unreconciled = _reconciled(run_dir, state)
    if unreconciled:
        err_console.print(f"[yellow]{unreconciled}[/]", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), "sites": rows, "reconciled": unreconciled is None}) + "\n")
    else:
        t = RichTable(title=f"privacy budget: {run_dir}")
        for col in ("site", "epsilon spent", "cap", "delta", "rounds paid"):
            t.add_column(col, justify="left" if col == "site" else "right")
        shown = rows
        if len(rows) > LONG_TABLE:  # the sites nearest their caps, and the spread; --json gives every row
            summary = spread({name: r["epsilon_spent"] for name, r in rows.items()}, worst="high")
            shown = {site: rows[site] for _, _, site in summary if site is not None}
            t.caption = (f"{len(rows)} sites: the 3 that spent most and the one that spent least; epsilon spent over all: "
                         + ", ".join(f"{label} {v:.4f}" for label, v, site in summary if site is None) + " (every row: --json)")
        for name, r in shown.items():
            t.add_row(name, f"{r['epsilon_spent']:.4f}", f"{r['epsilon_cap']:g}", f"{r['delta']:g}", str(r["rounds_paid"]))
        out_console.print(t)
    if _print_discrepancies(rows):
        raise Exit(1)


def verify(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    agreement: Annotated[Path | None, typer.Option(help="the signed agreement you hold: the anchor for every key")] = None,
    kit: Annotated[Path | None, typer.Option(help="your member kit: its agreement, keys and (a site's) record")] = None,
    state: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a run: signatures, Merkle tree, co-signed heads, epsilon, summary, model; anchored in what you hold.

    Without --agreement, --kit or --state the check is for consistency only, and says so. With --state, the
    site's ledger is also reconciled with what it signed. Exits 0 when every check passes, 1 naming the first
    violation.
    """
    require_run_folder(run_dir)  # before the heavy imports: a wrong path is said at once
    from consortium.api import verify as verify_anchored
    from consortium.audit.anchor import CONSISTENCY_ONLY
    from consortium.errors import VerificationError

    try:
        report = verify_anchored(run_dir, agreement=agreement, kit=kit, state=state)
        rows = _reconciled(run_dir, state)[0] if state is not None and (state / "budget.sqlite").exists() else {}
        deleted = [d for r in rows.values() for d in r.get("discrepancies", []) if d["kind"] != "unsigned"]
        if deleted:
            raise VerificationError(f"the ledger in {state} disagrees with what its site signed: " + "; ".join(
                f"run {d['run'][:12]} round {d['round']}: {d['detail']}" for d in deleted))
    except VerificationError as exc:
        if as_json:
            sys.stdout.write(json.dumps({"run_dir": str(run_dir), "verified": False, "violation": str(exc)}) + "\n")
        else:
            err_console.print(f"[bold red]verification failed[/]: {exc}", highlight=False, soft_wrap=True)
        raise Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), **report.to_json()}) + "\n")
        return
    head = report.tree_head
    out_console.print(
        f"[bold green]verified[/]: {report.entries} entries over {report.rounds} rounds, every one signed by its author; "
        f"{report.heads} tree heads signed by the coordinator and co-signed by {len(head['cosigned_by'])} sites; "
        f"tree head {head['size']} {head['root'][:16]}..."
    )
    if report.summary == "missing":
        err_console.print("[yellow]no summary.json[/]: the run's report is missing, so none of its figures were checked")
    else:
        out_console.print("summary.json is this run's: its run id, tree head, target epsilon, epsilon and metrics match signed entries")
    if report.epsilon_per_site:
        listed = report.epsilon_per_site
        if len(listed) > LONG_TABLE:
            eps = "; ".join(f"{label} {v:.3f}" for label, v, _ in spread(listed, worst="high")) + f" ({len(listed)} sites; --json lists each)"
        else:
            eps = ", ".join(f"{s} {e:.3f}" for s, e in listed.items())
        said = "matching the run's report" if report.summary == "bound" else "(no report to compare with)"
        out_console.print(f"epsilon recomputed from the events each site signed, {said}: {eps}")
        higher = {s: b for s, b in report.epsilon_bound_per_site.items() if b > report.epsilon_per_site.get(s, 0.0) + 1e-12}
        if higher:  # rounds a site was asked to join whose answer was lost: it may have paid them
            bound = ", ".join(f"{s} {b:.3f}" for s, b in higher.items())
            out_console.print(f"[yellow]at most[/], counting rounds whose answer was lost (the site may have paid them): {bound}")
    if report.final_model_sha256:
        out_console.print(f"final model file matches the transcript: sha256 {report.final_model_sha256[:16]}...")
    if report.lineage is not None:
        out_console.print("model lineage, every state change signed and in order:")
        for v in report.lineage.registry.versions.values():
            out_console.print(f"  {v.id} ({v.parent or 'the run'} -> {v.id}) {v.state}: {v.history[-1].reason}", highlight=False)
        running = {ver for ver in report.lineage.deployed.values()}
        where = ", ".join(f"{s} {ver or '-'}" for s, ver in report.lineage.deployed.items())
        out_console.print(f"  sites run: {where}" + (" (all on one version)" if len(running) == 1 else ""))
        if report.registry_stale:
            err_console.print("registry.json is behind the transcript (a write was cut short): consortium models list rebuilds it")
    for line in report.anchored_by:
        out_console.print(f"[bold green]anchored[/]: {line}", highlight=False)
    if not report.anchored_by:
        err_console.print(f"[bold yellow]{CONSISTENCY_ONLY}[/]", highlight=False, soft_wrap=True)


def audit(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a finished run's folder")],
    attacks: Annotated[str, typer.Option("--attacks", help="comma-separated: mia, inversion, canary, poisoning")] = "mia",
    shadows: Annotated[int, typer.Option("--shadows", min=2, max=1024, help="LiRA's shadow models (even)")] = 16,
    canaries: Annotated[int, typer.Option("--canaries", min=10, max=1_000_000, help="the one-run audit's canaries")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="the red team's own randomness")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Attack a finished run's model and data the way an adversary would; writes RUN_DIR/audit.json.

    mia: membership inference (loss threshold; LiRA with shadow models that replay the run), each site's
    members against its held-out records, TPR at low FPR against the ceiling the run's epsilon sets.
    inversion: gradient inversion of one round's update, one site's against the secure sum's, with the run's DP.
    canary: the one-run DP audit (Steinke et al.) of the run's DP-SGD, and of a deliberately broken copy.
    poisoning: the run replayed with a malicious site (scaling, sign flip, backdoor), undefended and defended.
    """
    from consortium.redteam.audit import AuditOptions, parse_attacks, run_audit

    names = parse_attacks(attacks)
    with err_console.status(f"red team: {', '.join(names)} against {run_dir}"):
        result = run_audit(run_dir, names, AuditOptions(shadows=shadows, seed=seed, canaries=canaries))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    _print_audit(result, names)


def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    compare: Annotated[
        list[Path] | None, typer.Option("--compare", help="another run folder, shown side by side (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="the HTML file to write (default: RUN_DIR/report.html)")] = None,
) -> None:
    """Write one self-contained HTML page: accuracy, epsilon per site, the red team's findings, verification."""
    from consortium.redteam.report import write_report

    written = write_report([run_dir, *(compare or [])], out)
    out_console.print(f"written: {written}")


def _print_audit(result: dict[str, Any], names: list[str]) -> None:
    """Every attack's result on the console (audit.json holds the same and more)."""
    from consortium.redteam.report_attacks import ceiling_in_words

    mia = result["attacks"].get("mia") if "mia" in names else None
    if mia is not None:
        for attack in ("loss", "lira"):
            if attack not in mia:
                continue
            t = RichTable(title=f"membership inference: {attack} ({mia['shadows']} shadows)" if attack == "lira" else
                          "membership inference: loss threshold")
            for col in ("site", "members", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "epsilon", "within DP bound"):
                t.add_column(col, justify="left" if col == "site" else "right")
            for v in mia[attack]["sites"]:
                rates = [f"{p['tpr']:.2%} [{p['interval'][0]:.2%}, {p['interval'][1]:.2%}]" for p in v["tpr_at_fpr"]]
                eps = "no DP" if v["epsilon"] is None else f"{v['epsilon']:.3g}"
                within = {None: "-", True: "yes", False: "[bold red]NO[/]"}[v["within_dp_bound"]]
                t.add_row(v["site"], str(v["members"]), f"{v['auc']:.3f}", *rates, eps, within)
            out_console.print(t)
        privacy = result.get("privacy") or {}
        eps = (privacy.get("epsilon_per_site") or {}).values() if privacy.get("enabled") else ()
        out_console.print(ceiling_in_words(max(eps) if eps else None, privacy.get("delta"))[0], highlight=False)
    secure = _secure(Path(result["run_dir"]))
    for name, render in (("inversion", _print_inversion), ("canary", _print_canary), ("poisoning", _print_poisoning)):
        section = result["attacks"].get(name)
        if name in names and section is not None:
            if "skipped" in section:
                out_console.print(f"{name}: not run: {section['skipped']}", highlight=False)
            else:
                render(section, secure)
    out_console.print(f"written: {Path(result['run_dir']) / 'audit.json'}")


def _secure(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text())["secure_aggregation"]["enabled"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _print_inversion(section: dict[str, Any], secure: bool) -> None:
    from consortium.redteam.report_attacks import inversion_reading

    unit = "dB PSNR" if section["metric"] == "psnr" else "mean error"
    t = RichTable(title=f"gradient inversion ({section['note']})")
    for col in ("observer", "batch", f"reconstruction ({unit})", "mean-image guess", "recovers inputs"):
        t.add_column(col, justify="left" if col == "observer" else "right")
    for r in section["rows"]:
        recovers, hypothetical = inversion_reading(r, secure)
        verdict = ("yes, were it unprotected" if hypothetical else "[bold red]yes[/]") if recovers else "no"
        observer = r["observer"] + (" (hypothetical: no secure aggregation)" if hypothetical else "")
        t.add_row(observer, str(r["batch_size"]), f"{r['quality']:.2f}", f"{r['baseline']:.2f}", verdict)
    out_console.print(t)


def _print_canary(section: dict[str, Any], secure: bool) -> None:
    t = RichTable(title=f"one-run DP audit ({section['as_run']['canaries']} canaries; at most epsilon {section['reach']:.2f} provable)")
    for col in ("mechanism", "correct guesses", "empirical epsilon (95%)", "accounted epsilon", "verdict"):
        t.add_column(col, justify="left" if col == "mechanism" else "right")
    for key, label in (("as_run", "the run's DP-SGD"), ("noise_divided_by_10", "control: noise divided by 10")):
        r = section[key]
        verdict = "[bold red]caught: less private than claimed[/]" if r["caught"] else "within its claim"
        t.add_row(label, f"{r['correct']} / {r['guesses']}", f"{r['lower_bound']:.3f}", f"{r['accounted_epsilon']:.3f}", verdict)
    out_console.print(t)


def _print_poisoning(section: dict[str, Any], secure: bool) -> None:
    def acc(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    for attack, runs in section["attacks"].items():
        t = RichTable(title=f"poisoning: {attack} by {section['attacker']} from round 2")
        for col in ("run", "secure agg.", "status", "final accuracy", "worst since attack", "backdoor success"):
            t.add_column(col, justify="left" if col == "run" else "right")
        for r in runs:
            t.add_row(r["label"], "on" if r["secure_aggregation"] else "off", r["status"], acc(r["accuracy"]),
                      acc(r["worst_accuracy"]), acc(r["backdoor_success"]))
        out_console.print(t)
