"""The report's shared drawing helpers and the red team's sections (``audit.json``): membership ROC curves
against the DP ceiling, gradient inversion, the one-run canary audit, poisoning (``consortium report``)."""

from __future__ import annotations

import html
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written to SVG
import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure

from consortium.redteam.metrics import dp_tpr_bound


def svg(fig: Figure, name: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG needs neither
    return f'<figure class="plot" data-plot="{html.escape(name)}">{svg}</figure>'


def roc_plot(mia: dict[str, Any], epsilon: float | None, delta: float | None) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    grid = np.geomspace(1e-4, 1, 200)
    for attack, style in (("loss", "--"), ("lira", "-")):
        if attack in mia:
            roc = mia[attack]["roc"]
            fpr, tpr = np.maximum(roc["fpr"], 1e-4), np.maximum(roc["tpr"], 1e-4)
            auc = mia[attack]["sites"][-1]["auc"]
            ax.plot(fpr, tpr, style, lw=2, label=f"{attack} (AUC {auc:.3f})")
    ax.plot(grid, grid, color="grey", lw=1, label="chance")
    if epsilon is not None:
        ceiling = [dp_tpr_bound(f, epsilon, delta or 0.0) for f in grid]
        ax.plot(grid, ceiling, color="#b3141b", lw=1.5, ls=":", label=f"DP ceiling, epsilon {epsilon:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return svg(fig, "roc")


def table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


#: A ceiling above this TPR at 0.1% FPR rules out nothing a reader would worry about: it is marked uninformative.
UNINFORMATIVE_CEILING = 0.5


def ceiling_in_words(epsilon: float | None, delta: float | None) -> tuple[str, bool]:
    """What the DP ceiling on membership attacks says at ``epsilon``, in words, and whether it says anything
    (False when even at 0.1% false positives it would allow an attack to find most members)."""
    if epsilon is None:
        return "No DP: nothing bounds what a membership attack may find; the measured rates are all there is.", False
    low, high = dp_tpr_bound(0.001, epsilon, delta or 0.0), dp_tpr_bound(0.01, epsilon, delta or 0.0)
    text = (
        f"The DP ceiling: at epsilon {epsilon:.3g} (delta {delta or 0:g}) no attack, however strong, can flag more than "
        f"{pct(low)} of the members while wrongly flagging 0.1% of non-members, nor more than {pct(high)} at 1%. "
    )
    informative = low <= UNINFORMATIVE_CEILING
    if informative:
        return text + "A measured rate at or under it is what the guarantee promises; one above it refutes the claim.", True
    return text + (
        "At this epsilon the ceiling is uninformative: it would allow an attack to find most members at 0.1% false "
        "positives, so 'within the ceiling' says nothing about safety here; the measured rates are the evidence."
    ), False


def membership_section(mia: dict[str, Any], privacy: dict[str, Any]) -> str:
    eps_map = privacy.get("epsilon_per_site") or {}
    epsilon = max(eps_map.values()) if privacy.get("enabled") and eps_map else None
    words, informative = ceiling_in_words(epsilon, privacy.get("delta"))
    parts = [roc_plot(mia, epsilon, privacy.get("delta")), f"<p class=ceiling data-informative={str(informative).lower()}>{html.escape(words)}</p>"]
    for attack in ("loss", "lira"):
        if attack not in mia:
            continue
        rows = []
        for v in mia[attack]["sites"]:
            rates = [f"{pct(p['tpr'])} <span class=muted>[{pct(p['interval'][0])}, {pct(p['interval'][1])}]</span>"
                     for p in v["tpr_at_fpr"]]
            within = {None: "no DP", True: "<span class=ok>yes</span>", False: "<span class=bad>NO</span>"}[v["within_dp_bound"]]
            if v["within_dp_bound"] is True and not informative:
                within = "<span class=muted>yes (uninformative ceiling)</span>"
            rows.append([html.escape(v["site"]), str(v["members"]), f"{v['auc']:.3f}", *rates, within])
        title = f"LiRA, {mia['shadows']} shadow runs" if attack == "lira" else "loss threshold"
        parts.append(f"<h3>{title}</h3>" + table(["site", "members", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "within DP ceiling"], rows))
    if "lira_skipped" in mia:
        parts.append(f"<p class=muted>LiRA not run: {html.escape(mia['lira_skipped'])}</p>")
    return "".join(parts)


def inversion_reading(row: dict[str, Any], secure: bool) -> tuple[bool, bool]:
    """(whether the attack recovers the inputs, whether the row is hypothetical for this run): a coordinator
    reading one site's update is what a run under secure aggregation never exposed."""
    recovers = row["gain"] > 3 * (1 if row["metric"] == "psnr" else 0.1)
    return recovers, secure and row["observer"].startswith("one site")


def inversion_section(section: dict[str, Any], secure: bool = False) -> str:
    """The inversion table; under ``secure`` aggregation the rows of a coordinator reading one site's update
    are marked as what they are: what a coordinator without it would see, not what this run exposed."""
    if "skipped" in section:
        return f"<p class=muted>not run: {html.escape(section['skipped'])}</p>"
    unit = "dB PSNR" if section["metric"] == "psnr" else "mean error (sd), lower is better"
    rows = []
    for r in section["rows"]:
        recovers, hypothetical = inversion_reading(r, secure)
        observer = html.escape(r["observer"])
        if hypothetical:
            observer += " <span class=muted>(hypothetical: a coordinator without secure aggregation; this run had it)</span>"
        verdict = ("<span class=muted>yes, were it unprotected</span>" if hypothetical else "<span class=bad>yes</span>") if recovers else "no"
        rows.append([observer, str(r["batch_size"]), f"{r['quality']:.2f}", f"{r['baseline']:.2f}", verdict,
                     {None: "n/a", True: "yes", False: "no"}[r.get("labels_exact")]])
    header = ["observer", "batch", f"reconstruction ({unit})", "mean-image guess", "recovers inputs", "labels exact"]
    skipped = section.get("labels_skipped")
    note = f"<p class=muted>labels not recovered: {html.escape(skipped)}</p>" if skipped else ""
    return f"<p class=muted>{html.escape(section['note'])}</p>" + table(header, rows) + note


def canary_section(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"<p class=muted>not run: {html.escape(section['skipped'])}</p>"
    rows = []
    for name, label in (("as_run", "the run's DP-SGD"), ("noise_divided_by_10", "control: noise divided by 10")):
        r = section[name]
        verdict = "<span class=bad>caught: less private than claimed</span>" if r["caught"] else "<span class=ok>within its claim</span>"
        rows.append([label, f"{r['correct']} / {r['guesses']}", f"{r['lower_bound']:.3f}", f"{r['accounted_epsilon']:.3f}", verdict])
    note = (f"<p class=muted>{section['as_run']['canaries']} canaries; with every guess right the audit could show at most "
            f"epsilon {section['reach']:.2f}.</p>")
    return table(["mechanism", "correct guesses", "empirical epsilon (95%)", "accounted epsilon", "verdict"], rows) + note


def poisoning_section(section: dict[str, Any]) -> str:
    if "skipped" in section:
        return f"<p class=muted>not run: {html.escape(section['skipped'])}</p>"
    parts = [f"<p>Site <b>{html.escape(section['attacker'])}</b> plays the attacker from round 2.</p>"]

    def acc(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    for attack, runs in section["attacks"].items():
        rows = [
            [html.escape(r["label"]), "on" if r["secure_aggregation"] else "off", html.escape(r["status"]),
             acc(r["accuracy"]), acc(r["worst_accuracy"]), acc(r["backdoor_success"]),
             f"<span class=muted>{html.escape(r['detail'])}</span>"]
            for r in runs
        ]
        parts.append(f"<h3>{html.escape(attack)}</h3>" + table(
            ["run", "secure agg.", "status", "final accuracy", "worst since attack", "backdoor success", "detail"], rows))
    return "".join(parts)
