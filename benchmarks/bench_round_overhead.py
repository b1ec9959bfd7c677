"""One round's protocol overhead against the local training it coordinates.

10 sites, a 1M-parameter MLP. The round runs through the real protocol
(coordinator, sites, in-process transport with full encode/decode). Local
training and local evaluation are timed inside the sites; everything else in
the round (building requests, encoding, hashing and checking tensors, decoding,
aggregating, the server step) is protocol overhead.

Baseline, measured in the same run: the sites' local training time.
"""

from __future__ import annotations

import time

import numpy as np

from consortium.data import Splits, Table
from consortium.learning.models import ModelSpec
from consortium.learning.strategies import FedAvg
from consortium.learning.training import TrainSettings
from consortium.protocol import site as site_module
from consortium.protocol.coordinator import Coordinator
from consortium.protocol.loop import RoundLoop
from consortium.protocol.site import Site
from consortium.transport import InProcessTransport

N_SITES = 10
N_FEATURES = 256
HIDDEN = (1024, 768)
ROWS = 256
REPEATS = 3


def _table(rng: np.random.Generator, n: int) -> Table:
    X = rng.standard_normal((n, N_FEATURES)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    return Table(X=X, y=y, feature_names=tuple(f"f{i}" for i in range(N_FEATURES)), classes=("no", "yes"))


def main() -> list[tuple[str, float, str]]:
    timers = {"train": 0.0, "evaluate": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t0

        return wrapper

    original = site_module.train_local, site_module.evaluate
    site_module.train_local = timed("train", original[0])
    site_module.evaluate = timed("evaluate", original[1])
    try:
        rng = np.random.default_rng(0)
        sites = {
            f"site-{i}": Site(f"site-{i}", Splits(_table(rng, ROWS), _table(rng, 8), _table(rng, 64)), seed=i)
            for i in range(N_SITES)
        }
        coordinator = Coordinator(
            list(sites),
            model=ModelSpec(kind="mlp", hidden=HIDDEN),
            train=TrainSettings(epochs=1, batch_size=32, lr=0.01),
            strategy=FedAvg(),
            rounds=REPEATS + 1,
            seed=0,
        )
        transport = InProcessTransport(sites)
        loop = RoundLoop()
        while loop.step(coordinator, transport) is None:  # setup and a warm-up round: not measured
            pass
        params = coordinator.params.size
        walls = []
        sent_before = transport.bytes_sent
        for _ in range(REPEATS):
            timers.update(train=0.0, evaluate=0.0)
            t0 = time.perf_counter()
            while loop.step(coordinator, transport) is None:  # fit, then evaluate
                pass
            walls.append((time.perf_counter() - t0, timers["train"], timers["evaluate"]))
        mb = (transport.bytes_sent - sent_before) / 1e6 / REPEATS
    finally:
        site_module.train_local, site_module.evaluate = original

    wall, train, ev = (float(np.median([w[i] for w in walls])) for i in range(3))
    overhead = wall - train - ev
    return [
        ("model parameters", float(params), ""),
        ("round wall time (s)", wall, f"{wall / train:.2f}x training"),
        ("local training, 10 sites (s)  [baseline]", train, "1.00x"),
        ("local evaluation (s)", ev, f"{ev / train:.2f}x training"),
        ("protocol overhead (s)", overhead, f"{overhead / train:.2f}x training"),
        ("bytes to sites per round (MB)", mb, ""),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:45s} {value:>12.4g}  {ratio}")
