"""One contract for every ``Channel``: the in-process one simulation uses, and the mailbox one deployment uses.

A channel only moves bytes: each member's request reaches that member as
given, each reply is offered to ``accept`` with the member it came from, an
accepted reply is returned under its member, a refused one never answers for
its member, and a member that does not answer is simply absent.
"""

from __future__ import annotations

import threading
import time

import pytest

from consortium.deploy.mailbox import Mailbox
from consortium.deploy.mailbox_transport import MailboxChannel
from consortium.errors import ProtocolError
from consortium.transport.inprocess import InProcessChannel

MEMBERS = ["site-1", "site-2", "site-3"]


class EchoSite:
    """A member that answers each request with ``name:request`` (bytes in, bytes out), unless told to keep quiet."""

    def __init__(self, name: str, *, silent: bool = False, forged_first: bool = False) -> None:
        self.name, self.silent, self.forged_first = name, silent, forged_first
        self.seen: list[bytes] = []

    def replies(self, raw: bytes) -> list[bytes]:
        self.seen.append(raw)
        genuine = f"{self.name}:".encode() + raw
        return [b"forged", genuine] if self.forged_first else [genuine]

    def handle_bytes(self, raw: bytes) -> bytes:  # the in-process channel's call
        return self.replies(raw)[-1] if not self.forged_first else b"forged"


class InProcess:
    def __init__(self, sites: dict[str, EchoSite]) -> None:
        self.sites = sites
        self.channel = InProcessChannel({n: s for n, s in sites.items() if not s.silent})

    def close(self) -> None:
        pass


class Mailboxed:
    """The mailbox channel with one polling thread per member, as the site agents poll the HTTPS service."""

    def __init__(self, sites: dict[str, EchoSite]) -> None:
        self.sites = sites
        self.mailbox = Mailbox()
        self.channel = MailboxChannel(self.mailbox, stage_timeout_s=2.0, pickup_timeout_s=1.0)
        self._threads = [threading.Thread(target=self._agent, args=(s,), daemon=True) for s in sites.values() if not s.silent]
        for t in self._threads:
            t.start()

    def _agent(self, site: EchoSite) -> None:
        while not self.mailbox.closed:
            raw = self.mailbox.take(site.name, 0.2)
            if raw is None:
                continue
            for reply in site.replies(raw):
                try:
                    self.mailbox.put_reply(site.name, reply)
                except ProtocolError:
                    pass  # the service answers 400; the agent goes on

    def close(self) -> None:
        self.mailbox.close()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture(params=[InProcess, Mailboxed], ids=["in-process", "mailbox"])
def make(request):
    made = []

    def build(sites: dict[str, EchoSite]):
        harness = request.param(sites)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        harness.close()


def _accept_all(member: str, raw: bytes) -> bytes:
    if not raw.startswith(f"{member}:".encode()):
        raise ProtocolError(f"not {member}'s reply")
    return raw  # type: ignore[return-value]


def test_each_request_reaches_its_member_and_each_reply_comes_back_under_it(make):
    sites = {n: EchoSite(n) for n in MEMBERS}
    harness = make(sites)
    requests = {n: f"request for {n}".encode() for n in MEMBERS}
    replies = harness.channel.handle_stage(requests, _accept_all)
    assert replies == {n: f"{n}:request for {n}".encode() for n in MEMBERS}
    assert all(sites[n].seen == [requests[n]] for n in MEMBERS)


def test_a_refused_reply_never_answers_for_its_member(make):
    sites = {n: EchoSite(n, forged_first=(n == "site-2")) for n in MEMBERS}
    harness = make(sites)
    replies = harness.channel.handle_stage({n: b"r" for n in MEMBERS}, _accept_all)
    if isinstance(harness, Mailboxed):  # the place stayed open: the genuine reply after the forged one counts
        assert replies["site-2"] == b"site-2:r"
    else:  # in process nothing else can come: the member is silent
        assert "site-2" not in replies
    assert replies["site-1"] == b"site-1:r" and replies["site-3"] == b"site-3:r"


def test_a_silent_member_is_absent_and_the_stage_still_ends(make):
    sites = {n: EchoSite(n, silent=(n == "site-3")) for n in MEMBERS}
    harness = make(sites)
    started = time.monotonic()
    replies = harness.channel.handle_stage({n: b"r" for n in MEMBERS}, _accept_all)
    assert sorted(replies) == ["site-1", "site-2"]
    assert time.monotonic() - started < 5.0
