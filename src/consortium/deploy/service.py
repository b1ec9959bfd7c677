"""The coordinator's HTTPS service: FastAPI on uvicorn, client certificates required and mapped to members.

Endpoints (OpenAPI at ``/openapi.json``):

- ``POST /v1/poll``: a site's long poll; 200 with its next sealed request
  (``application/octet-stream``), 204 when there is none yet, 410 once the
  run is over.
- ``POST /v1/reply``: a site's sealed reply to the current stage; 202, or
  409 when it was not asked (or answered already), 400 when its seal does
  not check out (a replay, another round's reply: the site's place stays
  free for its genuine reply), 413 when the body is over the declared limit
  (refused from its Content-Length, or while it streams, before anything is
  parsed).
- ``GET /v1/health``: answered on the event loop, whatever the polls do.

Fairness: only sites poll, reply and send heartbeats (an auditor or an
observer is refused at once, holding nothing); each site holds at most two
long polls and two replies at a time, and is answered 429 with Retry-After
beyond that, so a member flooding the service only queues behind itself.
Names from certificates are escaped before they reach the log, and a client
that hangs up mid-body is one log line.

Who is calling comes from the TLS layer: uvicorn checks the client
certificate against the consortium's CA, and the member is the certificate's
common name, which must name a member the service knows. The sealed
messages then bind every reply to that member's signing key as well.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Mapping

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import Kit, certificate_member
from consortium.errors import ConfigError, ProtocolError
from consortium.governance.roles import OPERATIONS

log = logging.getLogger("consortium.service")
PEER_CERTIFICATE = "consortium.peer_certificate"  # scope key: the client certificate, DER
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # a sealed 1M-parameter update in float64 is 8 MB; masked 32-bit, 4 MB


class _PeerCertificate:
    """Hands the connection's verified client certificate to the app (a mixin for uvicorn's HTTP protocols).

    uvicorn 0.54 does not implement the ASGI TLS extension; the certificate
    is read from the connection's TLS object once, when it is made.
    """

    app: object

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        super().connection_made(transport)  # type: ignore[misc]
        tls = transport.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        inner = self.app

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            scope[PEER_CERTIFICATE] = der
            await inner(scope, receive, send)  # type: ignore[operator]

        self.app = app


class _LoggedHandshake(ssl.SSLObject):
    """The server side of each TLS connection: a handshake the consortium's rules refuse (a certificate
    from another CA, an expired one, none at all) is logged in one line before the connection drops.
    asyncio itself says nothing of a failed handshake outside its debug mode."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake goes on: more bytes are needed
        except ssl.SSLError as exc:
            why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            if why.isupper():  # an OpenSSL reason code: PEER_DID_NOT_RETURN_A_CERTIFICATE
                why = why.replace("_", " ").lower()
            log.warning("refused TLS handshake: %s (a client certificate from the consortium's CA, valid now, is required)", why)
            raise


class PeerCertificateH11(_PeerCertificate, H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the peer certificate (httptools measured no faster here)."""


MAX_POLLS_PER_MEMBER = 2  # a site polls once at a time; twice covers an agent restarted mid-poll
MAX_REPLIES_PER_MEMBER = 2
RETRY_AFTER_S = 1
LOG_EVERY_S = 10.0  # one line per member and refusal this often at most: a flood does not flood the log too


def printable(name: object) -> str:
    """A name from a certificate or a token as it may go into a log line: control characters escaped."""
    text = str(name)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class _QuietLog:
    """Refusals logged one line per (status, member) every ``LOG_EVERY_S``, with a count of those left out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[int, str], tuple[float, int]] = {}

    def refused(self, status: int, member: str, why: str) -> None:
        now = time.monotonic()
        key = (status, member)
        with self._lock:
            last, quiet = self._last.get(key, (-LOG_EVERY_S, 0))
            if now - last < LOG_EVERY_S:
                self._last[key] = (last, quiet + 1)
                return
            self._last[key] = (now, 0)
        more = f" (and {quiet} more like it)" if quiet else ""
        log.warning("refused %s %s: %s%s", status, printable(member), printable(why), more)


class _Slots:
    """How many requests of one kind each member has in flight, capped per member (the event loop's own:
    only ever touched from the loop's thread)."""

    def __init__(self, per_member: int) -> None:
        self.per_member = per_member
        self._busy: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, member: str):  # type: ignore[no-untyped-def]
        """Yields True holding one of ``member``'s slots, or False when all of its own are in use (nobody else's is touched)."""
        if self._busy.get(member, 0) >= self.per_member:
            yield False
            return
        self._busy[member] = self._busy.get(member, 0) + 1
        try:
            yield True
        finally:
            self._busy[member] -= 1


def create_app(mailbox: Mailbox, members: Mapping[str, str], *, poll_wait_s: float = 20.0,
               max_message_bytes: int = MAX_MESSAGE_BYTES) -> FastAPI:
    """The service for ``members`` (name -> role) over ``mailbox``.

    Fairness: only members whose role trains (the sites) poll, reply or send heartbeats; each holds at
    most ``MAX_POLLS_PER_MEMBER`` long polls and ``MAX_REPLIES_PER_MEMBER`` replies at once, and its
    excess is answered 429 at once (with Retry-After). Long polls wait in worker threads of their own,
    enough for every site's share, so one member's flood leaves the others' shares free; the health
    check and the heartbeats run on the event loop and wait for no thread at all.
    """
    pollers = [name for name, role in members.items() if role in OPERATIONS["train"]]
    polls, replies = _Slots(MAX_POLLS_PER_MEMBER), _Slots(MAX_REPLIES_PER_MEMBER)
    quiet = _QuietLog()
    limiters: dict[str, anyio.CapacityLimiter] = {}

    def limiter(kind: str, per_member: int) -> anyio.CapacityLimiter:
        """A pool of worker threads for ``kind`` alone, with room for every site's whole share."""
        if kind not in limiters:
            limiters[kind] = anyio.CapacityLimiter(per_member * max(1, len(pollers)) + 1)
        return limiters[kind]

    app = FastAPI(title="Consortium coordinator", version="1", docs_url=None, redoc_url=None)

    def refuse(status: int, member: str, why: str, headers: dict[str, str] | None = None) -> HTTPException:
        quiet.refused(status, member, why)
        return HTTPException(status, why, headers=headers)

    def caller(request: Request) -> str:
        der = request.scope.get(PEER_CERTIFICATE)
        if der is None:
            raise refuse(401, "?", "a client certificate from the consortium's CA is required")
        member = certificate_member(der)
        if members.get(member) not in OPERATIONS["train"]:
            raise refuse(403, member, f"{member!r} is not a member that polls this coordinator (only sites do)")
        return member

    def busy(member: str, what: str) -> HTTPException:
        return refuse(429, member, f"{member!r} has {what} in flight already: retry in {RETRY_AFTER_S} s",
                      headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "closed" if mailbox.closed else "running"}

    @app.post("/v1/poll", responses={200: {"content": {"application/octet-stream": {}}}, 204: {}, 410: {}, 429: {}})
    async def poll(request: Request) -> Response:
        member = caller(request)
        with polls.hold(member) as held:
            if not held:
                raise busy(member, f"{MAX_POLLS_PER_MEMBER} polls")
            # at once when the run is over: then 410
            raw = await anyio.to_thread.run_sync(mailbox.take, member, poll_wait_s,
                                                 limiter=limiter("poll", MAX_POLLS_PER_MEMBER))
        if raw is None:
            return Response(status_code=410 if mailbox.closed else 204)
        if await request.is_disconnected() and mailbox.give_back(member, raw):
            log.warning("a poll of %s ended before its request could be sent: kept for its next poll", printable(member))
            return Response(status_code=204)
        return Response(content=raw, media_type="application/octet-stream")

    @app.post("/v1/heartbeat", status_code=204, responses={204: {}})
    async def heartbeat(request: Request) -> Response:
        """A site working on its request says it is alive (a stage stops waiting for one that falls silent)."""
        mailbox.heartbeat(caller(request))
        return Response(status_code=204)

    sealed_body = {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary", "maxLength": max_message_bytes}}
    }}}

    @app.post("/v1/reply", status_code=202, responses={400: {}, 409: {}, 413: {}, 429: {}}, openapi_extra=sealed_body)
    async def reply(request: Request) -> Response:
        member = caller(request)
        with replies.hold(member) as held:
            if not held:
                raise busy(member, f"{MAX_REPLIES_PER_MEMBER} replies")
            body = await _read_body(request, member)
            if not body:
                raise refuse(400, member, "an empty reply")
            try:  # the seal is checked before the reply takes the member's place in the stage
                taken = await anyio.to_thread.run_sync(mailbox.put_reply, member, bytes(body),
                                                       limiter=limiter("reply", MAX_REPLIES_PER_MEMBER))
            except ProtocolError as exc:
                raise refuse(400, member, f"the reply was rejected: {exc}") from None
        if not taken:
            raise refuse(409, member, f"{member!r} was not asked in this stage, or has answered already (a replay?)")
        return Response(status_code=202)

    async def _read_body(request: Request, member: str) -> bytearray:
        declared = request.headers.get("content-length")
        too_big = f"a message may carry at most {max_message_bytes} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > max_message_bytes):
            raise refuse(413, member, too_big)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_message_bytes:
                    raise refuse(413, member, too_big)
        except ClientDisconnect:
            log.warning("%s disconnected after %d bytes of its reply: nothing was taken", printable(member), len(body))
            raise HTTPException(400, "the client disconnected mid-body") from None  # nobody is there to read it
        return body

    return app


class HttpsServer:
    """uvicorn serving ``app`` over mutual TLS 1.3 with ``kit``'s certificate, in a background thread."""

    def __init__(
        self, app: FastAPI, kit: Kit, *, host: str = "127.0.0.1", port: int | None = None, client_certificates: bool = True
    ) -> None:
        """``client_certificates``: required (the protocol's service), or not asked for (the dashboard, which
        checks a signed grant instead, so that a browser can open it)."""
        config = uvicorn.Config(
            app, host=host, port=kit.port if port is None else port, log_level="warning",
            ssl_certfile=str(kit.folder / "tls.crt"), ssl_keyfile=str(kit.folder / "tls.key"),
            ssl_ca_certs=str(kit.folder / "ca.crt"), ssl_cert_reqs=ssl.CERT_REQUIRED if client_certificates else ssl.CERT_NONE,
            http=PeerCertificateH11, timeout_keep_alive=60,
        )
        config.load()
        assert config.ssl is not None
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
        config.ssl.sslobject_class = _LoggedHandshake
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="coordinator-https", daemon=True)

    def start(self, timeout_s: float = 20.0) -> int:
        """Start serving; the port it listens on."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ConfigError("the coordinator's HTTPS service did not start: is its port free?")
            time.sleep(0.02)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
