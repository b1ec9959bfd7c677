"""The coordinator's mailbox: sites behind firewalls poll for work; nothing connects to them.

Each protocol stage puts one sealed request per addressee in the mailbox and
waits until every addressee has answered or the stage's deadline passes
(whoever has not answered by then has dropped out of the stage, exactly as
in simulation). A request is handed out once; a reply is taken only from a
member that was asked in this stage and has not answered yet, so an
unsolicited reply is refused before it is even parsed. A stage may name an
``accept`` check (the transport's: the seal, its sender, round, freshness
and nonce): a reply takes its member's place only once it passes, so a
replayed or forged reply is refused and the genuine one still gets in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

Accept = Callable[[str, bytes], Any]  # (member, raw reply) -> what the stage returns for it; raises to refuse it


class Mailbox:
    """Requests waiting for their sites, replies waiting for their stage; one stage at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._outbox: dict[str, bytes] = {}
        self._expected: set[str] = set()
        self._inbox: dict[str, Any] = {}
        self._accept: Accept | None = None
        self._stage = 0  # which stage is open: a reply checked during one is not taken into the next
        self._closed = False
        self._seen: dict[str, float] = {}  # member -> when it last polled (monotonic)
        self._alive: dict[str, float] = {}  # member -> when it last took a request or sent a heartbeat
        self._given: dict[str, tuple[int, bytes]] = {}  # member -> (stage, request) it last took

    def run_stage(
        self, requests: dict[str, bytes], timeout_s: float, pickup_s: float | None = None, *, accept: Accept | None = None,
    ) -> dict[str, Any]:
        """Post one stage's requests; the replies that arrive before the deadline, by member (as ``accept``
        returned them; without it, the raw bytes).

        ``pickup_s``: a live site is always polling between stages, so it takes its request at once, and
        while it works on it its agent sends a heartbeat every few seconds. A site not heard from for
        ``pickup_s`` (it never took its request, or went silent after taking it) is gone: crashed or cut
        off, and the stage stops waiting for it. The others get up to ``timeout_s`` to answer.
        """
        posted = time.monotonic()
        deadline = posted + timeout_s
        with self._cond:
            self._outbox, self._expected, self._inbox = dict(requests), set(requests), {}
            self._accept, self._stage = accept, self._stage + 1
            self._cond.notify_all()
            while not self._closed:
                now = time.monotonic()
                waiting = self._expected - set(self._inbox)
                if pickup_s is not None:  # heard from since the stage began, and recently
                    waiting = {m for m in waiting if now - max(posted, self._alive.get(m, posted)) < pickup_s}
                if not waiting or now >= deadline:
                    break
                self._cond.wait(min(deadline - now, pickup_s / 4 if pickup_s is not None else deadline - now))
            replies = dict(self._inbox)
            self._outbox, self._expected, self._inbox, self._accept = {}, set(), {}, None
            return replies

    def take(self, member: str, wait_s: float) -> bytes | None:
        """The request waiting for ``member``, after up to ``wait_s`` seconds of long polling; None if none."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._seen[member] = time.monotonic()
            self._cond.notify_all()
            while member not in self._outbox and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            if self._closed:  # this poll returns now to say the run is over: the member is told (see wait_seen)
                self._seen[member] = time.monotonic()
                self._cond.notify_all()
            raw = self._outbox.pop(member, None)
            if raw is not None:
                self._alive[member] = time.monotonic()  # it has its request, and works on it
                self._given[member] = (self._stage, raw)
            return raw

    def give_back(self, member: str, raw: bytes) -> bool:
        """A request taken by a poll whose connection was gone (an agent that died mid-poll) goes back to
        the outbox for ``member``'s next poll, if its stage is still open and unanswered; whether it did."""
        with self._cond:
            if self._given.get(member) != (self._stage, raw) or not self._open_for(member):
                return False
            self._outbox[member] = raw
            self._alive.pop(member, None)  # taking it did not make the member alive
            self._cond.notify_all()
            return True

    def heartbeat(self, member: str) -> None:
        """``member`` is alive and working on its request (a mere poll is not: a restarted agent polls
        for work while the request its former self took is lost)."""
        with self._cond:
            self._alive[member] = time.monotonic()

    def _open_for(self, member: str) -> bool:
        return member in self._expected and member not in self._inbox and member not in self._outbox

    def put_reply(self, member: str, raw: bytes) -> bool:
        """Take ``member``'s reply to the current stage; False if it was not asked, or has answered already.

        The stage's ``accept`` check runs first, outside the lock (it may parse megabytes): whatever it
        raises, the reply is refused and the member's place stays free for its genuine reply."""
        with self._cond:
            if not self._open_for(member):
                return False
            accept, stage = self._accept, self._stage
        taken = raw if accept is None else accept(member, raw)
        with self._cond:
            if self._stage != stage or not self._open_for(member):
                return False
            self._inbox[member] = taken
            self._cond.notify_all()
            return True

    def wait_seen(self, members: list[str], *, since: float, timeout_s: float) -> list[str]:
        """Wait until every one of ``members`` has polled after ``since`` (a ``time.monotonic()``), or, after
        ``close``, has had a poll answered that the run is over; the members still unseen when ``timeout_s``
        runs out (none: all came)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                missing = [n for n in members if self._seen.get(n, -1.0) < since]
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    return missing
                self._cond.wait(left)

    def close(self) -> None:
        """The run is over: pollers are told so, and a waiting stage ends."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        """Whether the run is over."""
        return self._closed
