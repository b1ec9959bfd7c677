"""``consortium report RUN_DIR [--compare RUN_DIR ...]``: one self-contained HTML file a partner can read.

For each run, side by side when several are given: what the run was (data,
protections, warnings, the task), whether its transcript verifies, the
task's headline metric per round (accuracy, or a regression's MSE: the
consortium's, from the secure sums, and each site's own where the site kept
it), epsilon spent per site per round (recomputed from the privacy
events the sites signed), and the red team's findings from ``audit.json``:
ROC curves of the membership attacks on log axes against the ceiling the
run's epsilon sets, and the other attacks' tables.

Plots are drawn by matplotlib and embedded as inline SVG; the page loads
nothing from anywhere, so it can be mailed, archived, or opened offline.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to SVG
from matplotlib import pyplot as plt

from consortium.config import load_config
from consortium.governance.agreement import DP_DOES_NOT_COVER
from consortium.errors import ConsortiumError
from consortium.lifecycle.lineage import Lineage, describe_failures
from consortium.privacy.accountant import epsilon as account
from consortium.redteam.audit import AUDIT_FILE
from consortium.redteam.membership import AuditError, read_run_json
from consortium.redteam.report_attacks import (
    canary_section,
    inversion_section,
    membership_section,
    pct,
    poisoning_section,
    svg,
    table,
)
from consortium.runs import write_atomic
from consortium.audit.verify import read_entries, run_agreement, signed_events, verify_run

REPORT_FILE = "report.html"

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2430; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccd; }
.runs { display: grid; grid-template-columns: repeat(var(--columns), minmax(420px, 1fr)); gap: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccd; padding: 3px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.ok { color: #106b21; font-weight: bold; } .bad { color: #b3141b; font-weight: bold; }
.warn { background: #fff3cd; border-left: 4px solid #d39e00; padding: 4px 8px; margin: 4px 0; }
figure { margin: 8px 0; } figure svg { max-width: 100%; height: auto; }
.muted { color: #667; }
"""


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    done = [r for r in rounds if r.get(key) is not None]
    return [r["round"] for r in done], [r[key] for r in done]


def _accuracy_plot(
    rounds: list[dict[str, Any]], sites: dict[str, list[dict[str, Any]]], headline: str = "accuracy",
    ylim: tuple[float, float] | None = None,
) -> str:
    """The task's headline metric per round (accuracy; a regression's MSE); ``ylim``: the axis every
    compared run shares."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(*_series(rounds, headline), "o-", color="black", lw=2, label="consortium (secure sum)")
    if headline == "mse" and any(r.get("mean_mse") is not None for r in rounds):
        ax.plot(*_series(rounds, "mean_mse"), ":", color="grey", lw=1.5, label="predicting the mean")
    if any(r.get("shift_accuracy") is not None for r in rounds):
        ax.plot(*_series(rounds, "shift_accuracy"), "s:", color="grey", lw=1.5, label="consortium, under the declared shift")
    for site, points in sites.items():
        ax.plot(*_series(points, headline), ".--", lw=1, label=f"{site} (its own record)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {headline}")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return svg(fig, "accuracy")


def _reliability_plot(bins: list[dict[str, Any]], ece: float | None) -> str:
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    width = [b["high"] - b["low"] for b in bins]
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in the bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#b3141b", ms=4, label="mean confidence")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    if ece is not None:
        ax.set_title(f"expected calibration error {ece:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return svg(fig, "reliability")


def _fairness_plot(rounds: list[dict[str, Any]]) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.0))
    ax.plot(*_series(rounds, "demographic_parity_gap"), "o-", label="demographic parity gap")
    ax.plot(*_series(rounds, "equalized_odds_gap"), "s-", label="equalised odds gap")
    ax.set_xlabel("round")
    ax.set_ylabel("gap between the groups")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return svg(fig, "fairness")


def _names(sites: list[str], shown: int = 4) -> str:
    return ", ".join(sites) if len(sites) <= shown else ", ".join(sites[:shown]) + f" and {len(sites) - shown} more"


def epsilon_by_round(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each site's cumulative epsilon after each round it paid for, from the events it signed."""
    entries = read_entries(run_dir)
    manifest = entries[0].body
    privacy = manifest.get("privacy") or {}
    cache: dict[str, float] = {}
    out: dict[str, list[tuple[int, float]]] = {}
    for site, paid in signed_events(entries, manifest).items():
        curve = []
        for k in range(1, len(paid) + 1):
            events = [ev for _, ev in paid[:k]]
            key = json.dumps([ev.model_dump(mode="json") for ev in events], sort_keys=True)
            if key not in cache:  # sites paying the same events (the usual case) are accounted once
                cache[key] = account(events, privacy["delta"], privacy["accountant"])
            curve.append((paid[k - 1][0], cache[key]))
        out[site] = curve
    return out


def _epsilon_plot(curves: dict[str, list[tuple[int, float]]], caps: dict[str, float], top: float | None = None) -> str:
    """Each site's epsilon per round against its cap (dotted). Sites whose curve and cap coincide are drawn
    as one line that names them all, so no line hides another; distinct lines differ in style as well as
    colour. ``top``: the y-axis every compared run shares."""
    groups: dict[str, list[str]] = {}
    for site, curve in curves.items():
        groups.setdefault(json.dumps([curve, caps.get(site)]), []).append(site)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    styles = ["-", "--", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1))]
    for i, sites in enumerate(groups.values()):
        curve = curves[sites[0]]
        label = sites[0] if len(sites) == 1 else f"{len(sites)} sites alike: {_names(sites)}"
        line = ax.step([0] + [r for r, _ in curve], [0.0] + [e for _, e in curve], where="post", label=label,
                       ls=styles[i % len(styles)], lw=1.5 + (len(groups) - 1 - i) * 0.6)
        if sites[0] in caps:
            ax.axhline(caps[sites[0]], ls=":", color=line[0].get_color(), lw=1)
    if top is not None:
        ax.set_ylim(0, top)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent (dotted: cap)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return svg(fig, "epsilon")


def _lineage(lineage: Lineage) -> str:
    """Each version's state, parent and last change, its canary and monitoring verdicts, and who runs what."""
    rows = []
    for v in lineage.registry.versions.values():
        verdicts = [
            f"{e.body['purpose']}{'' if e.body['purpose'] == 'canary' else ' stage ' + str(e.body['stage'])}: "
            + ("passed" if e.body["passed"] else "<span class=bad>failed</span> " + html.escape(describe_failures(e.body["failed"])))
            for e in lineage.evaluations if e.body["version"] == v.id
        ]
        running = ", ".join(s for s, ver in lineage.deployed.items() if ver == v.id) or "-"
        rows.append([v.id, html.escape(v.state), v.parent or "-", html.escape(v.history[-1].reason), "<br>".join(verdicts) or "-", running])
    out = table(["version", "state", "parent", "last change", "evaluations (secure sums)", "running on"], rows)
    for site, e in sorted(lineage.open_incidents.items()):
        out += (f"<p class=bad>promotion paused: {html.escape(site)} reported drift in "
                f"{html.escape(', '.join(e.body.get('features', [])) or 'its label rates')} (entry {e.index})</p>")
    return out


def _results(summary: dict[str, Any], headline: str) -> str:
    """The federated model beside the baselines and the constant predictor, on every site's test records."""
    fed, local, pooled = summary.get("federated") or {}, summary.get("local_only") or {}, summary.get("pooled") or {}
    private = (summary.get("privacy") or {}).get("enabled")
    if headline == "accuracy":
        constant, what = fed.get("majority_accuracy"), "the majority class"

        def show(x: float | None) -> str:
            return "-" if x is None else pct(x)

        def versus(x: float | None) -> str:
            if x is None or constant is None:
                return ""
            gap = 100 * (x - constant)
            return f"<span class={'ok' if gap > 0 else 'bad'}>{gap:+.1f} points</span>"
    else:
        constant, what = fed.get("mean_mse"), "the mean"

        def show(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        def versus(x: float | None) -> str:
            if x is None or not constant:
                return ""
            return f"<span class={'ok' if x < constant else 'bad'}>{x / constant:.2f}x its MSE</span>"
    rows = [["federated" + (" (under DP)" if private else " (<span class=bad>no DP</span>)"), show(fed.get(headline)),
             versus(fed.get(headline))]]
    if local:
        rows.append(["local-only, mean of the sites <span class=muted>(not private)</span>",
                     show(local.get(f"{headline}_mean")), versus(local.get(f"{headline}_mean"))])
    if pooled:
        rows.append(["pooled, all records in one place <span class=muted>(not private)</span>",
                     show(pooled.get(headline)), versus(pooled.get(headline))])
    rows.append([f"constant: predicting {what}", show(constant), ""])
    rate = f"; the majority class is {pct(constant)} of the records" if headline == "accuracy" and constant is not None else ""
    return (f"<p>Scored on every site's test records{rate}.</p>"
            + table(["model", headline, f"against predicting {what}"], rows))


def _md(text: str) -> str:
    """A sentence written for Markdown (``**bold**``), as HTML."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _task_code(run_dir: Path, task: dict[str, Any]) -> str:
    """What code the task was, as the manifest every member endorsed names it, and whether the run's
    agreement accepts it (``verify --agreement`` proves that against the agreement you hold)."""
    sha = html.escape(str(task.get("sha256", ""))[:16])
    if task.get("code") == "framework":
        return f"the framework's built-in code <code>{sha}...</code>"
    what = f"a study's code <code>{sha}...</code>, endorsed by every member"
    try:
        agreement = run_agreement(run_dir, read_entries(run_dir)[0].body)
    except ConsortiumError:
        return what + " (<span class=bad>the run's copy of its agreement does not check</span>)"
    if agreement is None:
        return what + " (<span class=bad>no agreement: no site approval was required</span>)"
    if task.get("sha256") in {t.sha256 for t in agreement.tasks}:
        return what + ", accepted by the run's agreement and approved by each site"
    return what + " (<span class=bad>not among the run's agreement's tasks</span>)"


def _run_column(run_dir: Path, limits: dict[str, Any] | None = None) -> str:
    """One run's column; ``limits``: the y-axes every compared run shares (``_shared_limits``)."""
    limits = limits or {}
    summary = read_run_json(run_dir / "summary.json")
    privacy = summary.get("privacy") or {}
    sa = summary.get("secure_aggregation") or {}
    task = summary.get("task") or {}
    headline = str(task.get("headline") or "accuracy")
    out = [f"<section class=run><h2>{html.escape(run_dir.name)}</h2>"]
    if task.get("name"):
        out.append(f"<p class=task>task <b>{html.escape(str(task['name']))}</b> "
                   f"({html.escape(str(task.get('target', '')))}; headline metric {html.escape(headline)}); "
                   f"{_task_code(run_dir, task)}</p>")
    dp = (f"{privacy.get('level', 'record')}-level DP, target epsilon {privacy.get('target_epsilon')}, "
          f"delta {privacy.get('delta')}") if privacy.get("enabled") else "<span class=bad>no differential privacy</span>"
    secure = "secure aggregation" if sa.get("enabled") else "<span class=bad>no secure aggregation</span>"
    out.append(f"<p>{html.escape(str(summary.get('dataset')))}, {summary.get('sites')} sites, {summary.get('rounds')} rounds, "
               f"status <b>{html.escape(str(summary.get('status')))}</b>; {secure}; {dp}.</p>")
    out += [f"<div class=warn>{html.escape(w)}</div>" for w in summary.get("warnings", [])]
    out.append("<h2>Results</h2>" + _results(summary, headline))

    out.append("<h2>Transcript</h2>")
    try:
        v = verify_run(run_dir)
        head = v.tree_head
        out.append(f"<p class=ok data-verified=true>verified</p><p>{v.entries} signed entries over {v.rounds} rounds; "
                   f"tree head {head['size']} <code>{head['root'][:16]}...</code> co-signed by "
                   f"{len(head['cosigned_by'])} sites; status {v.status}.</p>")
        verified = True
    except ConsortiumError as exc:
        out.append(f"<p class=bad data-verified=false>verification FAILED: {html.escape(str(exc))}</p>")
        verified = False
    if verified and v.lineage is not None:
        out.append("<h2>Model versions</h2>" + _lineage(v.lineage))

    out.append(f"<h2>{html.escape(headline.upper() if headline == 'mse' else headline.capitalize())} per round</h2>")
    rounds = _lines(run_dir / "metrics.jsonl")
    sites_dir = run_dir / "sites"
    site_curves = {p.parent.name: _lines(p) for p in sorted(sites_dir.glob("*/evaluation.jsonl"))}
    out.append(_accuracy_plot(rounds, {k: v for k, v in site_curves.items() if v}, headline, limits.get("headline")))
    if not any(site_curves.values()):
        out.append(f"<p class=muted>Each site's own {html.escape(headline)} stays with the site; none was found beside this run.</p>")
    last = next((r for r in reversed(rounds) if r.get(headline) is not None), None)
    if last is not None and last.get("site_accuracy_std") is not None:
        out.append(f"<p>Across sites, last round (from sums only): mean accuracy {pct(last['site_accuracy_mean'])}, "
                   f"standard deviation {pct(last['site_accuracy_std'])}.</p>")

    out.append("<h2>Calibration</h2>")
    bins = ((last or {}).get("evaluation") or {}).get("reliability") or []
    out.append(_reliability_plot(bins, last.get("ece")) if bins and last is not None else
               "<p class=muted>no calibration statistics in this run</p>")

    out.append("<h2>Fairness</h2>")
    if any(r.get("demographic_parity_gap") is not None for r in rounds):
        try:
            feature = load_config(run_dir / "config.yaml").evaluation.sensitive_feature or "the declared attribute"
        except ConsortiumError:
            feature = "the declared attribute (config.yaml unreadable)"
        out.append(f"<p>Groups of <b>{html.escape(feature)}</b> (at or below the threshold, above), summed over sites.</p>")
        out.append(_fairness_plot(rounds))
    else:
        out.append("<p class=muted>no sensitive attribute declared (evaluation.sensitive_feature in the config)</p>")

    out.append("<h2>Epsilon spent per site</h2>")
    if privacy.get("enabled") and verified:
        out.append(_epsilon_plot(epsilon_by_round(run_dir), privacy.get("epsilon_cap_per_site") or {}, limits.get("epsilon")))
    elif privacy.get("enabled"):
        out.append("<p class=bad>not shown: the transcript the events come from does not verify</p>")
    else:
        out.append("<p class=bad>no DP: no privacy budget was spent or protected</p>")
    if privacy.get("enabled"):
        out.append(f"<p>{_md(DP_DOES_NOT_COVER)}</p>")

    audit_path = run_dir / AUDIT_FILE
    audit = read_run_json(audit_path) if audit_path.exists() else {"attacks": {}}
    out.append("<h2>Membership inference</h2>")
    if "mia" in audit["attacks"]:
        out.append(membership_section(audit["attacks"]["mia"], audit.get("privacy") or privacy))
    else:
        out.append("<p class=muted>not audited: run <code>consortium audit RUN_DIR --attacks mia</code></p>")
    secure = bool(sa.get("enabled"))
    for key, title, render in (("inversion", "Gradient inversion", lambda s: inversion_section(s, secure)),
                               ("canary", "One-run DP audit", canary_section),
                               ("poisoning", "Poisoning and robust aggregation", poisoning_section)):
        if key in audit["attacks"]:
            out.append(f"<h2>{title}</h2>" + render(audit["attacks"][key]))
    out.append("</section>")
    return "".join(out)


def _shared_limits(run_dirs: list[Path]) -> dict[str, Any]:
    """The y-axes compared runs share, so that their plots read side by side: the headline metric's range
    over every run's rounds and sites (accuracy: 0 to 1), and the largest epsilon cap or spend."""
    values, epsilons, headline = [], [], "accuracy"
    for d in run_dirs:
        summary = read_run_json(d / "summary.json")
        headline = str((summary.get("task") or {}).get("headline") or headline)
        privacy = summary.get("privacy") or {}
        epsilons += [*(privacy.get("epsilon_cap_per_site") or {}).values(), *(privacy.get("epsilon_per_site") or {}).values()]
        for path in [d / "metrics.jsonl", *sorted((d / "sites").glob("*/evaluation.jsonl"))]:
            values += [r[k] for r in _lines(path) for k in (headline, "mean_mse", "shift_accuracy") if r.get(k) is not None]
    limits: dict[str, Any] = {}
    if headline == "accuracy":
        limits["headline"] = (0.0, 1.0)
    elif values:
        low, high = min(values), max(values)
        pad = 0.05 * (high - low or abs(high) or 1.0)
        limits["headline"] = (low - pad, high + pad)
    if epsilons:
        limits["epsilon"] = 1.08 * max(epsilons)
    return limits


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of ``run_dirs`` (one column each) to ``out`` (default: the first run's report.html)."""
    for d in run_dirs:
        if not d.is_dir():
            raise AuditError(f"run folder '{d}' does not exist: pass the folder a run printed")
    limits = _shared_limits(run_dirs) if len(run_dirs) > 1 else {}
    columns = "".join(_run_column(d, limits) for d in run_dirs)
    title = "Consortium report: " + ", ".join(d.name for d in run_dirs)
    page = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<div class=runs style='--columns: {len(run_dirs)}'>{columns}</div>"
        # Counts the plots the browser actually laid out (non-empty boxes): what a reader (or a test) can check.
        "<script>addEventListener('load', () => { const p = [...document.querySelectorAll('figure.plot svg')];"
        " document.body.dataset.plots = p.length; document.body.dataset.rendered = p.filter(s => {"
        " const r = s.getBoundingClientRect(); return r.width > 50 && r.height > 50; }).length; });</script>"
        "</body></html>"
    )
    target = out or run_dirs[0] / REPORT_FILE
    write_atomic(target, page.encode())
    return target
