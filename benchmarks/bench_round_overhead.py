"""One round's protocol overhead against the local training it coordinates.

10 sites, a 1M-parameter MLP. The round runs through the real protocol as a
simulation runs it (coordinator, strict sites, in-process transport with full
encode/decode, every message sealed and checked, each round's plan proven
from the transcript). Local
training and local evaluation are timed inside the sites; everything else in
the round (building requests, encoding, hashing and checking tensors, decoding,
aggregating, the server step) is protocol overhead.

Baseline, measured in the same run: the sites' local training time.

The transcript's cost is measured in the same rounds: the recorder (signing
and appending the entries, the coordinator's tree head, every site's
consistency check and co-signature) plus what the protocol does only for the
transcript (hashing the model at the coordinator and the sites, the sites
signing their decisions), as a share of the round's wall time; and, apart,
the evidence archive (every site's masked input and the revealed shares,
written so that ``consortium verify`` can recompute the round's sum). These
rounds run without secure aggregation, so the archive's cost is measured as
what dominates it under SecAgg: writing ten 1M-word masked inputs (safetensors,
atomic, fsync'd).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_save

from consortium.crypto import keys
from consortium.data import Splits, Table
from consortium.learning.specs import ModelSpec, TrainSettings
from consortium.learning.strategies import FedAvg
from consortium.protocol import coordinator as coordinator_module
from consortium.protocol import site_training as training_module
from consortium.protocol import trainer as trainer_module
from consortium.protocol.coordinator import COORDINATOR, Coordinator
from consortium.run.session import Session
from consortium.protocol.site import Site
from consortium.protocol.site_witness import Witness
from consortium.runs import write_atomic
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
    timers = {"train": 0.0, "evaluate": 0.0, "transcript": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - t0

        return wrapper

    # Where the site and the coordinator call them: the site's trainer and training part, its witness.
    patches = [
        (trainer_module, "train_local", "train"), (training_module, "evaluate", "evaluate"),
        (coordinator_module, "vector_sha256", "transcript"), (training_module, "vector_sha256", "transcript"),
        (Witness, "sign_decision", "transcript"),
    ]
    original = [getattr(owner, attr) for owner, attr, _ in patches]
    for (owner, attr, timer), fn in zip(patches, original):
        setattr(owner, attr, timed(timer, fn))
    tmp = tempfile.TemporaryDirectory()
    try:
        rng = np.random.default_rng(0)
        names = [f"site-{i}" for i in range(N_SITES)]
        ids = {u: keys.generate_ed25519()[0] for u in [*names, COORDINATOR]}
        directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
        sites = {
            u: Site(
                u, Splits(_table(rng, ROWS), _table(rng, 8), _table(rng, 64)), seed=i,
                identity=ids[u], directory=directory, strict=True,
            )
            for i, u in enumerate(names)
        }
        coordinator = Coordinator(
            list(sites),
            model=ModelSpec(kind="mlp", hidden=HIDDEN),
            train=TrainSettings(epochs=1, batch_size=32, lr=0.01),
            strategy=FedAvg(),
            rounds=REPEATS + 1,
            seed=0,
        )
        transport = InProcessTransport(sites, identity=ids[COORDINATOR], directory=directory)
        # The run's own session: plans proven, decisions and rounds recorded, heads co-signed over the transport.
        session = Session(transport, Path(tmp.name), coordinator_key=ids[COORDINATOR], sites=names, coordinator=coordinator)
        session.recorder.start({"members": {u: {"role": "site"} for u in names}}, {})
        loop = session.loop
        loop.before_stage = timed("transcript", loop.before_stage)
        while (record := loop.step(coordinator, transport)) is None:  # setup and a warm-up round: not measured
            pass
        session.record_round(record)
        params = coordinator.params.size
        walls = []
        sent_before = transport.bytes_sent
        for _ in range(REPEATS):
            timers.update(train=0.0, evaluate=0.0, transcript=0.0)
            t0 = time.perf_counter()
            while (record := loop.step(coordinator, transport)) is None:  # fit, then evaluate
                pass
            t1 = time.perf_counter()
            session.record_round(record)
            t2 = time.perf_counter()
            walls.append((t2 - t0, timers["train"], timers["evaluate"], timers["transcript"] + (t2 - t1)))
        mb = (transport.bytes_sent - sent_before) / 1e6 / REPEATS
    finally:
        for (owner, attr, _), fn in zip(patches, original):
            setattr(owner, attr, fn)
        tmp.cleanup()

    with tempfile.TemporaryDirectory() as folder:
        masked = {u: rng.integers(0, 2**32, params, dtype=np.uint32) for u in names}
        t0 = time.perf_counter()
        write_atomic(Path(folder) / "round.safetensors", safetensors_save(masked))
        archive = time.perf_counter() - t0

    wall, train, ev, transcript = (float(np.median([w[i] for w in walls])) for i in range(4))
    overhead = wall - train - ev - transcript
    return [
        ("model parameters", float(params), ""),
        ("round wall time (s)", wall, f"{wall / train:.2f}x training"),
        ("local training, 10 sites (s)  [baseline]", train, "1.00x"),
        ("local evaluation (s)", ev, f"{ev / train:.2f}x training"),
        ("protocol overhead, transcript excluded (s)", overhead, f"{overhead / train:.2f}x training"),
        ("transcript: hashes, signatures, entries, co-signed head (s)", transcript, f"{100 * transcript / wall:.1f}% of the round"),
        ("evidence archive under SecAgg: 10 masked inputs, 40 MB (s)", archive, f"{100 * archive / wall:.1f}% of the round"),
        ("bytes to sites per round (MB)", mb, ""),
    ]


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:45s} {value:>12.4g}  {ratio}")
