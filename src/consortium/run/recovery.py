"""A coordinator that died continues its run: the transcript and its state change as one step.

The transcript (``transcript.jsonl``) is what every member verifies; the
coordinator's state store (``consortium.deploy.state``) holds what the
transcript cannot: the model, the strategy's state, the history. They are
kept consistent by a write-ahead record, as a database keeps its journal:

1. at the end of each round (and once after setup, as "round 0") the
   session (``consortium.run.session``) signs the round's transcript entries without writing them, and commits
   them in ONE transaction with the checkpoint taken after the round;
2. only then are they appended to the transcript, and their head co-signed.

So an outcome (an ``aggregate`` or ``evaluation`` entry) is never in the
transcript unless the state it leads to is committed, and a committed state
whose entries did not all reach the transcript carries them itself. Between
rounds only two things are appended outside the record, both before any
outcome: the next round's plan (co-signed before it goes out) and, as soon as that round's
request stage closes, the decisions the sites signed (what each paid).

``recover`` (``serve --recover``) then does, for each crash point of
``consortium.crashpoints``:

- before setup's commit: nothing to continue (refused, one line);
- ``setup_committed``: setup's entries are appended from the record; round
  1 is planned afresh;
- ``round_committed``, ``round_appending``: appends the missing entries of
  the record, closes their head: the round completes;
- ``round_appended``: closes the head: the round completes;
- ``round_cosigned``: the round stands; the next is planned afresh;
- ``plan_appended``, ``plan_cosigned``, ``decisions_appended``,
  ``round_archived`` (and a kill anywhere inside a round, between its plan
  and its commit): the round cut off is aborted: its one outcome is
  a ``skipped`` aggregate, the model unchanged, under a co-signed head, and
  its number is not reused. What the sites signed that they paid for it
  stays in the transcript; each site of its cohort whose decision the crash
  lost is listed in that entry's ``unaccounted`` with the planned event, so
  the run's epsilon bound counts what it may have paid. A plan under no
  head reached no site, so it leaves nothing unaccounted.
- ``model_written``: the last round stands; the model is written again, and named;
- ``final_appended``: the head is closed and the summary written.

Anything else after the committed state (an outcome the state does not
know) means the folder was changed: recovery refuses rather than guesses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from consortium.errors import ConfigError
from consortium.transcript.log import Entry

if TYPE_CHECKING:  # the session records through this module's write-ahead keys
    from consortium.run.session import Session

WAL = "write_ahead"  # the checkpoint's key for the entries it commits
COVERS = "transcript_size"  # and for the transcript's size once they are appended


class StateStore(Protocol):
    def save_round(self, record: dict[str, Any] | None, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None: ...

    def latest(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None: ...


def recover(state: StateStore, session: Session) -> None:
    """Bring the session's transcript and coordinator back to one consistent point (see the module's
    docstring); the coordinator is then ready for the next round, or done.

    Raises:
        ConfigError: nothing was committed yet, or the folder was changed after the coordinator stopped.
    """
    coordinator, transcript, run = session.coordinator, session.recorder, session.run
    assert run is not None
    latest = state.latest()
    if latest is None:
        raise ConfigError(
            f"the coordinator of {run.path} stopped before its setup was saved: there is nothing to continue; start a new run"
        )
    meta, arrays = latest
    pending = [Entry.model_validate(e) for e in meta.pop(WAL, [])]
    covers = int(meta.pop(COVERS, transcript.writer.size))
    if transcript.writer.size < covers - len(pending):
        raise ConfigError(
            f"the transcript of {run.path} holds {transcript.writer.size} entries, fewer than the coordinator's state "
            "had committed: it was cut short, and the run cannot be recovered"
        )
    transcript.commit(pending)  # whatever of the record the crash kept from the transcript
    entries = transcript.writer.entries
    rnd = int(meta["round"])
    after = entries[covers:]
    finished = bool(after) and after[0].kind == "final_model" and rnd >= coordinator.rounds
    for e in after:
        if finished and e.round == rnd and e.kind in ("final_model", "model_version"):
            continue  # the run's last entries: only their head and the summary are missing
        if e.round != rnd + 1 or e.kind not in ("round_plan", "site_decision"):
            raise ConfigError(
                f"transcript entry {e.index} ({e.kind}, round {e.round}) follows the last state the coordinator "
                f"committed (round {rnd}), which knows nothing of it: the run cannot be recovered"
            )
    run.reset_metrics(list(meta["history"]))  # the rounds the checkpoint holds, no more
    coordinator.restore(meta, arrays, open_next=False)
    plan = next((e for e in after if e.kind == "round_plan"), None)
    if plan is not None:
        reason = f"aborted: the coordinator stopped during round {plan.round} and restarted"
        event = plan.body.get("privacy_event")
        seen = any(h.size > plan.index for h in transcript.writer.heads)  # under no head, no site was asked
        decided = {e.author for e in after if e.kind == "site_decision"}
        unaccounted = {s: event for s in plan.body["cohort"] if s not in decided} if event is not None and seen else {}
        session.record_round(coordinator.skip_interrupted(reason, list(plan.body["cohort"]), unaccounted))
    elif transcript.writer.heads[-1].size < len(entries):
        transcript.close_round()  # the round's entries, complete, under a head of their own
    coordinator.open_next()


