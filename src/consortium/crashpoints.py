"""Named points where a test may kill the coordinator: ``CONSORTIUM_CRASH_AT=<name>``.

Test-only and harmless in production: unless that variable names a point,
``reached`` does nothing. When it does, the process ends at once with
``os._exit(CRASH_EXIT)``, as a SIGKILL or a power cut would end it: no
``finally``, no flush, no goodbye to the sites. In-process tests replace
``reached`` (``monkeypatch``) to raise instead. ``consortium.run.recovery``
says what a restarted coordinator (``serve --recover``) does at each point.
"""

from __future__ import annotations

import os

CRASH_ENV = "CONSORTIUM_CRASH_AT"
CRASH_EXIT = 75  # what a coordinator killed at a crash point exits with

#: Every point, in the order a round reaches them, with the state it leaves behind.
CRASH_POINTS: dict[str, str] = {
    "setup_committed": "setup's checkpoint is committed; round 1's plan is not in the transcript",
    "plan_appended": "a round's plan is in the transcript, under no head: no site has seen it",
    "plan_cosigned": "the plan is under a co-signed head; its requests may have gone out",
    "decisions_appended": "the sites' signed decisions (what each paid) are in the transcript; the round goes on",
    "round_archived": "the round's evidence files are written; nothing of its outcome is committed",
    "round_committed": "the round's entries and the checkpoint after it are committed in one transaction; "
    "the transcript lacks the entries",
    "round_appending": "the first of the round's entries is appended, the others not",
    "round_appended": "every entry of the round is appended; no head covers them",
    "round_cosigned": "the round's head is co-signed; the next round's plan is not in the transcript",
    "model_written": "the final model's file is written; the transcript does not name it yet",
    "final_appended": "the final model's entry is appended, under no head, and no summary is written",
}


def reached(name: str) -> None:
    """The coordinator is at crash point ``name``: end the process here if the test asked for it."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT)
