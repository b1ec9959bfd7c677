"""The run's summary, bound to its transcript: ``summary.json`` may claim only what signed entries say.

``summary.json`` is what people read (the console, the report, ``budget``);
the transcript is what members signed. Every claim of the summary that the
transcript can vouch for is checked against it: the run's identity (the
manifest's ``run_id``, endorsed by every member), its tree head (one of the
heads the coordinator signed and the sites co-signed), the target epsilon
(the manifest's), each site's epsilon (recomputed from the events it signed)
and its bound (with the rounds it was asked to join whose answer was lost)
and the final metrics (the last round's ``evaluation`` entry). A summary
placed beside another run's transcript, or edited after the run, fails one
of these. What the transcript cannot vouch for (elapsed time, traffic,
the local-only and pooled yardsticks, computed outside the protocol) is not
checked, and the check says so by not naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from consortium.errors import VerificationError
from consortium.transcript.log import Entry, TreeHead

SUMMARY_FILE = "summary.json"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary as a JSON object, ``None`` when there is none; one-line errors when it is malformed."""
    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{SUMMARY_FILE} is not JSON ({type(exc).__name__}): it was damaged or replaced") from None
    if not isinstance(summary, dict):
        raise VerificationError(f"{SUMMARY_FILE} holds a JSON {type(summary).__name__}, not the run's summary object")
    return summary


def _section(summary: dict[str, Any], name: str) -> dict[str, Any]:
    value = summary.get(name)
    if not isinstance(value, dict):
        raise VerificationError(f"{SUMMARY_FILE}: its '{name}' section is {json.dumps(value)[:40]}, not an object")
    return value


def _same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_summary(
    summary: dict[str, Any], entries: list[Entry], heads: list[TreeHead], epsilon_per_site: dict[str, float],
    epsilon_bound_per_site: dict[str, float],
) -> None:
    """Raise ``VerificationError`` naming the first claim of ``summary`` that the signed record contradicts."""
    manifest = entries[0].body
    run_id = manifest.get("run_id")
    if summary.get("run_id") != run_id:
        raise VerificationError(
            f"{SUMMARY_FILE} is of run {summary.get('run_id')}, the transcript's manifest is of run {run_id}: "
            "the summary and the transcript come from different runs"
        )
    head = _section(_section(summary, "transcript"), "tree_head")
    if not any(h.size == head.get("size") and h.root == head.get("root") for h in heads):
        raise VerificationError(
            f"{SUMMARY_FILE} claims tree head {head.get('size')} {str(head.get('root'))[:16]}..., "
            "which is not among the heads the coordinator signed for this transcript"
        )
    privacy = _section(summary, "privacy")
    signed_privacy = manifest.get("privacy") or {}
    if bool(privacy.get("enabled")) != bool(signed_privacy.get("enabled")):
        raise VerificationError(
            f"{SUMMARY_FILE} says differential privacy was {'on' if privacy.get('enabled') else 'off'}, "
            f"the manifest says {'on' if signed_privacy.get('enabled') else 'off'}"
        )
    if privacy.get("enabled"):
        if not _same(privacy.get("target_epsilon"), signed_privacy.get("target_epsilon")):
            raise VerificationError(
                f"{SUMMARY_FILE} states a target epsilon of {privacy.get('target_epsilon')}, "
                f"the manifest every member endorsed says {signed_privacy.get('target_epsilon')}"
            )
        reported = privacy.get("epsilon_per_site")
        if not isinstance(reported, dict):
            raise VerificationError(f"{SUMMARY_FILE}: privacy.epsilon_per_site is not an object of site to epsilon")
        for site, eps in epsilon_per_site.items():
            said = reported.get(site)
            if not isinstance(said, (int, float)) or not _same(said, eps):
                raise VerificationError(f"site '{site}': the events it signed add up to epsilon {eps:.6g}, the run reported {said}")
        bound = privacy.get("epsilon_bound_per_site")
        for site, eps in epsilon_bound_per_site.items():
            said = bound.get(site) if isinstance(bound, dict) else None
            if not isinstance(said, (int, float)) or not _same(said, eps):
                raise VerificationError(
                    f"site '{site}': with the rounds it was asked to join and whose answer was lost, its epsilon is at "
                    f"most {eps:.6g}, the run reported a bound of {said}"
                )
    _check_metrics(_section(summary, "federated"), entries)


def _check_metrics(federated: dict[str, Any], entries: list[Entry]) -> None:
    """The final metrics are the last round's evaluation entry's, figure for figure."""
    claimed = {k: v for k, v in federated.items() if k not in ("rounds_completed", "rounds_skipped")}
    if not claimed:
        return
    last_round = max(e.round for e in entries if e.kind == "round_plan") if any(e.kind == "round_plan" for e in entries) else 0
    evaluations = [e for e in entries if e.kind == "evaluation" and e.round == last_round and "purpose" not in e.body]
    if not evaluations:
        raise VerificationError(f"{SUMMARY_FILE} reports metrics for round {last_round}, and no evaluation entry records any")
    recorded = evaluations[-1].body.get("metrics") or {}
    for name, value in claimed.items():
        if name not in recorded or not _same(value, recorded[name]):
            raise VerificationError(
                f"{SUMMARY_FILE} reports {name} {value}, the evaluation entry {evaluations[-1].index} records "
                f"{recorded.get(name, 'no such metric')}"
            )
