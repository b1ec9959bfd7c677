"""One secure round over mutual TLS on loopback against the same round in-process.

10 sites, a 1M-parameter MLP, secure aggregation on, every message sealed,
each round's plan proven from the transcript: the product's defaults. The
in-process round is the baseline, measured in the same run; the rounds
alternate between the two deployments and the medians are reported.

Over HTTPS every request waits in the coordinator's mailbox until its site's
long poll collects it (uvicorn, TLS 1.3, client certificates from the
consortium's CA) and every reply is POSTed back (httpx). Here the service and
the ten agents are threads of one process sharing two cores with the
coordinator; separate processes on separate machines would add network
latency and remove that contention. Transcript co-signatures are protocol
requests like the rest, in both.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from consortium.crypto import keys
from consortium.data import Splits, Table
from consortium.deploy.agent import SiteAgent
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import load_kit, provision
from consortium.deploy.service import HttpsServer, create_app
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import FedAvg
from consortium.learning.training import TrainSettings
from consortium.protocol.coordinator import COORDINATOR, Coordinator, SecureAggregation
from consortium.protocol.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.transcript.recorder import TranscriptRecorder, over_transport
from consortium.transport import InProcessTransport
from consortium.transport.mailbox import MailboxTransport

N_SITES = 10
N_FEATURES = 256
HIDDEN = (1024, 768)
ROWS = 128
REPEATS = 3


def _table(rng: np.random.Generator, n: int) -> Table:
    X = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    return Table(X=X, y=y, feature_names=tuple(f"f{i}" for i in range(N_FEATURES)), classes=("no", "yes"))


class _Deployment:
    """A coordinator, its sites and its transcript, driven one round at a time."""

    def __init__(self, folder: Path, names: list[str], transport_factory) -> None:  # type: ignore[no-untyped-def]
        rng = np.random.default_rng(0)
        ids = {u: keys.generate_ed25519()[0] for u in [*names, COORDINATOR]}
        self.directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
        self.ids = ids
        self.sites = {
            u: Site(u, Splits(_table(rng, ROWS), _table(rng, 8), _table(rng, 64)), seed=i, identity=ids[u],
                    directory=self.directory, strict=True)
            for i, u in enumerate(names)
        }
        self.coordinator = Coordinator(
            names, model=ModelSpec(kind="mlp", hidden=HIDDEN), train=TrainSettings(epochs=1, batch_size=32, lr=0.01),
            strategy=FedAvg(), rounds=2 * REPEATS + 2, seed=0,
            secure=SecureAggregation(identity=ids[COORDINATOR], directory=self.directory),
        )
        self.transport = transport_factory(self)
        self.recorder = TranscriptRecorder(folder, coordinator_key=ids[COORDINATOR],
                                           cosign=over_transport(self.transport, names, lambda: self.coordinator.round))
        self.loop = RoundLoop(before_stage=self.recorder.prove_plan)
        self._names = names

    def start(self) -> None:
        self.recorder.start({"members": {u: {"role": "site"} for u in self._names}}, {})

    def round(self) -> float:
        t0 = time.perf_counter()
        while self.loop.step(self.coordinator, self.transport) is None:
            pass
        self.recorder.record(self.coordinator.drain_log())
        self.recorder.close_round()
        return time.perf_counter() - t0


def main() -> list[tuple[str, float, str]]:
    names = [f"site-{i}" for i in range(N_SITES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        provision(root / "kits", sites=names, coordinator_address="127.0.0.1:8443")
        local = _Deployment(root / "local", names, lambda d: InProcessTransport(d.sites, identity=d.ids[COORDINATOR],
                                                                                  directory=d.directory))
        mailbox = Mailbox()
        server = HttpsServer(create_app(mailbox, {u: "site" for u in names}, poll_wait_s=5.0),
                             load_kit(root / "kits" / "kits" / COORDINATOR), port=0)
        port = server.start()
        remote = _Deployment(root / "remote", names, lambda d: MailboxTransport(mailbox, identity=d.ids[COORDINATOR],
                                                                                  directory=d.directory))
        agents = [SiteAgent(load_kit(root / "kits" / "kits" / u), remote.sites[u], base_url=f"https://127.0.0.1:{port}")
                  for u in names]
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        for t in threads:
            t.start()
        try:
            local.start(), remote.start()
            local.round(), remote.round()  # setup and a warm-up round each: not measured
            local_times, remote_times = [], []
            for _ in range(REPEATS):
                local_times.append(local.round())
                remote_times.append(remote.round())
            params = local.coordinator.params.size
            mb = remote.transport.bytes_sent / 1e6
        finally:
            mailbox.close()
            for t in threads:
                t.join(30)
            server.stop()
    base, https = float(np.median(local_times)), float(np.median(remote_times))
    return [
        ("model parameters", float(params), ""),
        ("secure round, in-process transport (s)  [baseline]", base, "1.00x"),
        ("secure round over mutual TLS on loopback (s)", https, f"{https / base:.2f}x in-process (target <= 1.5x)"),
        ("network cost of the round (s)", https - base, f"{100 * (https - base) / base:.0f}% of the in-process round"),
        ("bytes sent to sites over HTTPS, all rounds (MB)", mb, ""),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:52s} {value:>12.4g}  {ratio}")
