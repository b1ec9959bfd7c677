"""Secure aggregation (SecAgg+): the coordinator only ever learns the sum.

- ``quantize``: clipping, unbiased stochastic rounding, overflow-free ring sizes;
- ``graph``: complete and random k-regular neighbour graphs, with degree and
  threshold planned from the expected dropout and corruption rates;
- ``messages`` / ``protocol``: the site and coordinator state machines;
- :func:`secure_sum`: every stage in-process, for users and tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from consortium.crypto import keys
from consortium.crypto.prg import ring_dtype
from consortium.errors import ConfigError, ProtocolError
from consortium.secagg.graph import GraphPlan, plan_graph
from consortium.secagg.messages import STAGES, SessionParams
from consortium.secagg.protocol import (
    SecAggAborted,
    SecAggClient,
    SecAggError,
    SecAggServer,
)
from consortium.secagg.quantize import (
    QuantConfig,
    dequantize_sum,
    plan_quantization,
    quantize,
    sum_error_bound,
)

__all__ = [
    "STAGES",
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "SecureSum",
    "SessionParams",
    "make_session",
    "run_session",
    "secure_sum",
]


def make_session(
    participants: Sequence[str], length: int, *, bits: int, plan: GraphPlan | None = None, session_id: str | None = None
) -> SessionParams:
    """Session parameters for ``participants``, with the graph ``plan_graph`` chooses for them."""
    names = tuple(sorted(participants))
    plan = plan or plan_graph(len(names))
    return SessionParams(
        session_id=session_id or os.urandom(32).hex(),
        participants=names,
        graph=plan.kind,
        degree=plan.degree,
        threshold=plan.threshold,
        bits=bits,
        length=length,
        self_ack=plan.self_ack,
    )


def run_session(
    params: SessionParams,
    inputs: Mapping[str, np.ndarray],
    *,
    drop: Mapping[str, str] | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Run every stage in-process; ``drop`` maps a site to the stage at which it vanishes.

    Returns the sum of the included inputs modulo 2^bits and the included sites.
    Raises ``SecAggAborted`` when fewer than the threshold remain.
    """
    drop = dict(drop or {})
    for site, stage in drop.items():
        if stage not in STAGES:
            raise ConfigError(f"unknown stage '{stage}' for site '{site}': choose one of {', '.join(STAGES)}")
    identities = {u: keys.generate_ed25519()[0] for u in params.participants}
    directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in identities.items()}
    server_key = keys.generate_ed25519()[0]
    server_pub = keys.ed25519_public_bytes(server_key.public_key())
    clients = {u: SecAggClient(u, identities[u], params, directory, server_pub) for u in params.participants}
    server = SecAggServer(params, server_key, directory)

    refused: dict[str, str] = {}

    def alive(stage: str) -> list[str]:
        cut = STAGES.index(stage)
        return [u for u in clients if u not in refused and (u not in drop or STAGES.index(drop[u]) > cut)]

    def answer(u: str, method, *args):  # a site that refuses a request answers nothing from then on
        try:
            return method(*args)
        except ProtocolError as exc:
            refused[u] = str(exc)
            return None

    for u in alive("advertise_keys"):
        server.add_advert(u, clients[u].advertise_keys())
    rosters = server.close_advertise()
    for u in alive("share_keys"):
        if u in rosters and (bundle := answer(u, clients[u].share_keys, rosters[u])):
            server.add_shares(u, bundle)
    deliveries = server.close_share_keys()
    for u in alive("collect_masked"):
        if u in deliveries and (masked := answer(u, clients[u].collect_masked, deliveries[u], inputs[u])):
            server.add_masked(u, masked)
    survivors = server.close_collect_masked()
    for u in alive("consistency_check"):
        if u in survivors.survivors and (ack := answer(u, clients[u].consistency_check, survivors)):
            server.add_ack(u, ack)
    requests = server.close_consistency()
    for u in alive("unmask"):
        if u in requests and (reply := answer(u, clients[u].unmask, requests[u])):
            server.add_unmask(u, reply)
    outcome = server.finish()
    return outcome.total, outcome.included


@dataclass(frozen=True)
class SecureSum:
    total: np.ndarray  # float64: the dequantised sum over ``survivors``
    survivors: list[int]  # indices of the updates included in the sum
    error_bound: float  # per coordinate: |total - sum of clipped updates| stays below this
    quantization: QuantConfig
    threshold: int
    graph: str


def secure_sum(
    updates: Sequence[np.ndarray],
    *,
    clip: float,
    drop: Mapping[int, str] | None = None,
    seed: int | None = None,
    bits: int = 32,
) -> SecureSum:
    """Sum float vectors through every stage of SecAgg+, in-process.

    ``clip`` bounds each coordinate; ``drop`` maps an update's index to the
    stage at which its site vanishes; ``seed`` fixes the stochastic rounding
    (the keys and masks always come from the operating system's CSPRNG).
    """
    if len(updates) < 2:
        raise ConfigError(f"secure aggregation needs at least 2 updates, got {len(updates)}")
    vectors = [np.asarray(u, dtype=np.float64).ravel() for u in updates]
    length = vectors[0].size
    if any(v.size != length for v in vectors):
        raise ConfigError("every update must have the same length")
    names = [f"site-{i:05d}" for i in range(len(vectors))]
    qcfg = plan_quantization(clip=clip, n_sites=len(vectors), bits=bits)
    rng = np.random.default_rng(seed)
    inputs = {n: quantize(v, qcfg, rng, dtype=ring_dtype(bits)) for n, v in zip(names, vectors)}
    params = make_session(names, length, bits=bits, session_id=hashlib.sha256(os.urandom(32)).hexdigest())
    drops = {names[i]: stage for i, stage in (drop or {}).items()}
    total, included = run_session(params, inputs, drop=drops)
    return SecureSum(
        total=dequantize_sum(total, len(included), qcfg),
        survivors=[names.index(u) for u in included],
        error_bound=sum_error_bound(len(included), qcfg),
        quantization=qcfg,
        threshold=params.threshold,
        graph=params.graph,
    )
