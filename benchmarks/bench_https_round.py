"""One secure round over mutual TLS on loopback against the same round in-process.

10 sites, a 1M-parameter MLP, secure aggregation on, every message sealed,
each round's plan proven from the transcript: the product's defaults. The
in-process round is the baseline, measured in the same run; the rounds
alternate between the two deployments and the medians are reported.

Over HTTPS every request waits in the coordinator's mailbox until its site's
long poll collects it (uvicorn, TLS 1.3, client certificates from the
consortium's CA) and every reply is POSTed back (httpx). Two deployments are
measured: the ten site agents as threads of the coordinator's process (one
interpreter, so they take turns), and as ten separate processes with their
own kits, as in a real deployment (on this 2-core machine they then also
train in parallel, which the in-process round cannot). Transcript
co-signatures are protocol requests like the rest, everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from consortium.crypto import keys
from consortium.crypto.keyfile import load_identity_key
from consortium.data import Splits
from consortium.deploy.agent import SiteAgent
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import load_kit, provision
from consortium.deploy.service import HttpsServer, create_app
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import FedAvg
from consortium.protocol.coordinator import COORDINATOR, Coordinator, SecureAggregation
from consortium.run.session import Session
from consortium.protocol.site import Site
from consortium.transport import InProcessTransport
from consortium.deploy.mailbox_transport import MailboxTransport

from bench_round_overhead import HIDDEN, N_SITES, _table  # the same model and data as that round

ROWS = 128
REPEATS = 3


class _Deployment:
    """A coordinator, its sites and its transcript, driven one round at a time."""

    def __init__(self, folder: Path, names: list[str], transport_factory, kits: Path | None = None) -> None:  # type: ignore[no-untyped-def]
        if kits is None:  # every member's key made here, and the sites live in this process
            ids = {u: keys.generate_ed25519()[0] for u in [*names, COORDINATOR]}
            self.directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
            self.sites = {u: _site(u, i, ids[u], self.directory) for i, u in enumerate(names)}
        else:  # the sites are processes of their own; the coordinator holds only its own kit's key
            ids = {COORDINATOR: load_identity_key(kits / COORDINATOR / "identity.key")}
            self.directory = _directory(kits / COORDINATOR)
            self.sites = {}
        self.ids = ids
        self.coordinator = Coordinator(
            names, model=ModelSpec(kind="mlp", hidden=HIDDEN), train=TrainSettings(epochs=1, batch_size=32, lr=0.01),
            strategy=FedAvg(), rounds=2 * REPEATS + 2, seed=0,
            secure=SecureAggregation(identity=ids[COORDINATOR], directory=self.directory),
        )
        self.transport = transport_factory(self)
        self.session = Session(self.transport, folder, coordinator_key=ids[COORDINATOR], sites=names, coordinator=self.coordinator)
        self._names = names

    def start(self) -> None:
        self.session.recorder.start({"members": {u: {"role": "site"} for u in self._names}}, {})

    def round(self) -> float:
        t0 = time.perf_counter()
        while (record := self.session.loop.step(self.coordinator, self.transport)) is None:
            pass
        self.session.record_round(record)
        return time.perf_counter() - t0


def _site(name: str, index: int, identity, directory: dict[str, bytes]) -> Site:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(index)
    return Site(name, Splits(_table(rng, ROWS), _table(rng, 8), _table(rng, 64)), seed=index, identity=identity,
                directory=directory, strict=True)


def _directory(kit: Path) -> dict[str, bytes]:
    members = json.loads((kit / "consortium.json").read_text())["members"]
    return {name: bytes.fromhex(m["public_key"]) for name, m in members.items()}


def _site_process(kit_dir: str, index: int, url: str) -> None:
    """A site in its own process, from its own kit, polling the coordinator until the run is over."""
    import torch

    torch.set_num_threads(1)  # ten sites share two cores: one thread each, not two
    kit = load_kit(Path(kit_dir))
    site = _site(kit.member, index, load_identity_key(kit.folder / "identity.key"), _directory(kit.folder))
    SiteAgent(kit, site, base_url=url).run()


class _Service:
    def __init__(self, kit: Path, names: list[str]) -> None:
        self.mailbox = Mailbox()
        self.server = HttpsServer(create_app(self.mailbox, {u: "site" for u in names}, poll_wait_s=5.0), load_kit(kit), port=0)
        self.url = f"https://127.0.0.1:{self.server.start()}"

    def close(self) -> None:
        self.mailbox.close()
        self.server.stop()


def main() -> list[tuple[str, float, str]]:
    names = [f"site-{i}" for i in range(N_SITES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        provision(root / "threads", sites=names, coordinator_address="127.0.0.1:8443")
        provision(root / "processes", sites=names, coordinator_address="127.0.0.1:8443")
        local = _Deployment(root / "local", names, lambda d: InProcessTransport(d.sites, identity=d.ids[COORDINATOR],
                                                                                  directory=d.directory))
        threaded_service = _Service(root / "threads" / "kits" / COORDINATOR, names)
        threaded = _Deployment(root / "t", names, lambda d: MailboxTransport(threaded_service.mailbox,
                                                                               identity=d.ids[COORDINATOR], directory=d.directory))
        agents = [SiteAgent(load_kit(root / "threads" / "kits" / u), threaded.sites[u], base_url=threaded_service.url)
                  for u in names]
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        process_service = _Service(root / "processes" / "kits" / COORDINATOR, names)
        separate = _Deployment(root / "p", names, lambda d: MailboxTransport(process_service.mailbox,
                                                                               identity=d.ids[COORDINATOR], directory=d.directory),
                               kits=root / "processes" / "kits")
        processes = [
            subprocess.Popen([sys.executable, __file__, "--site", str(root / "processes" / "kits" / u), str(i), process_service.url])
            for i, u in enumerate(names)
        ]
        for t in threads:
            t.start()
        try:
            deployments = (local, threaded, separate)
            times: dict[int, list[float]] = {0: [], 1: [], 2: []}
            for d in deployments:
                d.start()
                d.round()  # setup and a warm-up round each: not measured
            for _ in range(REPEATS):
                for i, d in enumerate(deployments):
                    times[i].append(d.round())
            params = local.coordinator.params.size
            mb = threaded.transport.bytes_sent / 1e6
        finally:
            threaded_service.close()
            process_service.close()
            for t in threads:
                t.join(30)
            for p in processes:
                p.wait(30)
    base, https, apart = (float(np.median(times[i])) for i in range(3))
    return [
        ("model parameters", float(params), ""),
        ("secure round, in-process transport (s)  [baseline]", base, "1.00x"),
        ("same over mutual TLS, agents as threads of one process (s)", https, f"{https / base:.2f}x in-process (target <= 1.5x)"),
        ("same over mutual TLS, each site its own process (s)", apart, f"{apart / base:.2f}x in-process (target <= 1.5x)"),
        ("bytes sent to sites over HTTPS, all rounds (MB)", mb, ""),
    ]

if __name__ == "__main__" and sys.argv[1:2] == ["--site"]:
    _site_process(sys.argv[2], int(sys.argv[3]), sys.argv[4])
elif __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:52s} {value:>12.4g}  {ratio}")
