"""The site agent: runs next to the data, connects out to the coordinator only, and answers with the site runtime.

It long-polls the coordinator over mutual TLS (httpx, the kit's client
certificate, only the consortium's CA trusted), hands each sealed request to
the same ``Site`` as in simulation (guard, budget, transcript checks and
all), and posts the sealed reply. Connection failures are retried with
exponential backoff; a poll the coordinator turns away as one too many (429)
is retried after the time it names; the agent stops when the coordinator
says the run is over.
"""

from __future__ import annotations

import threading

import httpx

from consortium.deploy.provision import Kit
from consortium.protocol.site import Site


def _retry_after(response: httpx.Response, default_s: float = 1.0) -> float:
    """The seconds a 429 asks the agent to wait (1 to 30; ``default_s`` when it names none)."""
    text = response.headers.get("retry-after", "")
    return min(30.0, max(1.0, float(text))) if text.isdigit() else default_s


class SiteAgent:
    """One site's agent: polls the coordinator, answers with its ``Site``, until the run is over."""

    def __init__(
        self, kit: Kit, site: Site, *, base_url: str | None = None, max_backoff_s: float = 10.0, heartbeat_s: float = 2.0
    ) -> None:
        self.kit = kit
        self.site = site
        self.base_url = base_url or f"https://{kit.host}:{kit.port}"
        self.max_backoff_s = max_backoff_s
        self.heartbeat_s = heartbeat_s  # while it works on a request, it says so this often
        self.answered = 0

    def _answer(self, client: httpx.Client, request: bytes) -> bytes:
        """The site's reply to ``request``, with heartbeats to the coordinator while it is being worked out."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    client.post("/v1/heartbeat")
                except httpx.HTTPError:
                    pass  # the reply itself will tell whether the coordinator is there

        beating = threading.Thread(target=beat, name="heartbeat", daemon=True)
        beating.start()
        try:
            return self.site.handle_bytes(request)
        finally:
            done.set()
            beating.join()

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll and answer until the run is over (410) or ``stop`` is set."""
        stop = stop or threading.Event()
        backoff = 0.05
        with httpx.Client(base_url=self.base_url, verify=self.kit.client_context(), timeout=httpx.Timeout(120.0)) as client:
            while not stop.is_set():
                try:
                    polled = client.post("/v1/poll")
                    if polled.status_code == 410:
                        return
                    if polled.status_code == 204:
                        continue
                    if polled.status_code == 429:  # its polls are all in flight (a former connection's): wait its turn
                        stop.wait(_retry_after(polled))
                        continue
                    polled.raise_for_status()
                    reply = self._answer(client, polled.content)
                    client.post("/v1/reply", content=reply, headers={"content-type": "application/octet-stream"})
                    self.answered += 1
                    backoff = 0.05
                except httpx.TransportError:
                    stop.wait(backoff)  # the coordinator is away: try again, less and less often
                    backoff = min(backoff * 2, self.max_backoff_s)
