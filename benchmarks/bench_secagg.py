"""SecAgg+ round cost against its floor: the raw keystream of the masks it must generate.

Two shapes: 10 sites x 1M parameters (complete graph) and 100 sites x 100k
parameters (random k-regular graph). Every stage runs for real, in-process:
keys, signatures, Shamir sharing, AES-GCM, masking, consistency check,
unmasking. Client time adds up all sites' work (quantisation included);
server time is the coordinator's. Baselines, measured in the same run: the
floor (expanding exactly as many mask vectors as the round needs, nothing
else) and the plain round (summing the float vectors with numpy).

Also measured in the same run, for the record: the public-key work each
session of these rounds does besides the keystream. Per site and
neighbour, two X25519 agreements (the share-encryption key and the
pairwise mask seed; one key pair cannot serve both, because a dropped
site's mask key is rebuilt by the coordinator) and one Ed25519 check of
the neighbour's signed keys (else the coordinator could substitute its
own; only a key the two sites already shared from an earlier session
could replace it, which this implementation does not keep). At 100k
parameters a neighbour's mask is about 60 us of keystream and those three
operations cost more than that on their own, which is why the 100-site
round cannot come within 2x of the keystream alone.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from consortium.crypto import keys, prg
from consortium.secagg import SecAggClient, SecAggServer, make_session
from consortium.secagg.messages import advert_statement
from consortium.secagg.quantize import plan_quantization, quantize


class Clock:
    """Adds up the time of each call, by side (client or server) and by step (the function's name)."""

    def __init__(self) -> None:
        self.client = 0.0
        self.server = 0.0
        self.steps: dict[str, float] = defaultdict(float)

    def run(self, side: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        setattr(self, side, getattr(self, side) + dt)
        self.steps[f"{side}: {fn.__name__}"] += dt
        return out


# The steps reported one by one, in round order; the server's other calls (constructor, the close_*
# stage ends, add_unmask) are reported together.
CLIENT_STEPS = ("quantize", "SecAggClient", "advertise_keys", "share_keys", "collect_masked", "consistency_check", "unmask")
SERVER_STEPS = ("add_advert", "add_shares", "add_masked", "add_ack", "finish")


def one_round(n: int, length: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-1, 1, length).astype(np.float32) for _ in range(n)]
    names = [f"site-{i:03d}" for i in range(n)]
    ids = {u: keys.generate_ed25519()[0] for u in names}
    directory = {u: keys.ed25519_public_bytes(k.public_key()) for u, k in ids.items()}
    server_key = keys.generate_ed25519()[0]
    server_pub = keys.ed25519_public_bytes(server_key.public_key())

    t0 = time.perf_counter()
    plain = np.zeros(length, dtype=np.float64)
    for u in updates:
        plain += u
    plain_time = time.perf_counter() - t0

    clock = Clock()
    q = plan_quantization(clip=1.0, n_sites=n, bits=32)
    params = make_session(names, length, bits=q.bits)
    ring = prg.ring_dtype(q.bits)

    def quantize_update(x: np.ndarray) -> np.ndarray:
        return quantize(x, q, rng, dtype=ring)

    quantize_update.__name__ = "quantize"
    inputs = {u: clock.run("client", quantize_update, x) for u, x in zip(names, updates)}
    clients = {u: clock.run("client", SecAggClient, u, ids[u], params, directory, server_pub) for u in names}
    server = clock.run("server", SecAggServer, params, server_key, directory)
    for u, c in clients.items():
        clock.run("server", server.add_advert, u, clock.run("client", c.advertise_keys))
    rosters = clock.run("server", server.close_advertise)
    for u, c in clients.items():
        clock.run("server", server.add_shares, u, clock.run("client", c.share_keys, rosters[u]))
    deliveries = clock.run("server", server.close_share_keys)
    for u, c in clients.items():
        clock.run("server", server.add_masked, u, clock.run("client", c.collect_masked, deliveries[u], inputs[u]))
    survivors = clock.run("server", server.close_collect_masked)
    for u, c in clients.items():
        clock.run("server", server.add_ack, u, clock.run("client", c.consistency_check, survivors))
    requests = clock.run("server", server.close_consistency)
    for u, c in clients.items():
        clock.run("server", server.add_unmask, u, clock.run("client", c.unmask, requests[u]))
    outcome = clock.run("server", server.finish)
    assert len(outcome.included) == n
    total = (outcome.total.astype(np.float64)) * q.step - n * q.clip
    assert np.max(np.abs(total - plain)) <= n * q.step  # the sum is right

    # The floor: the keystream of every mask this round had to expand (each site: its self
    # mask and one per neighbour; the server: every survivor's self mask), from the cipher
    # alone into a reused buffer: no allocation, no arithmetic.
    n_masks = sum(1 + params.degree for _ in names) + n
    nbytes = length * prg.ring_dtype(q.bits).itemsize
    buf = bytearray(min(nbytes, 1 << 18) + 15)
    zeros = bytes(len(buf) - 15)
    t0 = time.perf_counter()
    for i in range(n_masks):
        enc = Cipher(algorithms.AES(i.to_bytes(32, "big")), modes.CTR(bytes(16))).encryptor()
        for off in range(0, nbytes, len(zeros)):
            enc.update_into(zeros[: min(len(zeros), nbytes - off)], buf)
    floor = time.perf_counter() - t0

    # The public-key work the rounds require, per site and neighbour: two X25519 agreements and one
    # Ed25519 check of a signed advert (the real statement's size), nothing else.
    x_sk, _ = keys.generate_x25519()
    peer = keys.x25519_public_bytes(keys.generate_x25519()[1])
    statement = advert_statement(params.session_id, names[0], peer, peer)
    signature = keys.sign(ids[names[0]], statement)
    t0 = time.perf_counter()
    for _ in range(n * params.degree):
        keys.exchange(x_sk, peer)
        keys.exchange(x_sk, peer)
        keys.verify(directory[names[0]], signature, statement)
    public_key = time.perf_counter() - t0
    whole = clock.client + clock.server
    steps = {f"client: {k}": clock.steps[f"client: {k}"] for k in CLIENT_STEPS}
    steps |= {f"server: {k}": clock.steps[f"server: {k}"] for k in SERVER_STEPS}
    steps["server: other calls"] = clock.server - sum(clock.steps[f"server: {k}"] for k in SERVER_STEPS)
    return {
        "steps": steps,
        "graph": params.graph,
        "degree": params.degree,
        "threshold": params.threshold,
        "client_s": clock.client,
        "client_per_site_s": clock.client / n,
        "server_s": clock.server,
        "round_s": whole,
        "floor_s": floor,
        "public_key_s": public_key,
        "plain_s": plain_time,
    }


def main() -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    for n, length in ((10, 1_000_000), (100, 100_000)):
        r = one_round(n, length)
        label = f"{n} sites x {length // 1000}k ({r['graph']}, k={r['degree']}, t={r['threshold']})"
        rows += [
            (f"{label}: mask keystream floor (s)  [baseline]", r["floor_s"], "1.00x"),
            (f"{label}: client, all sites (s)", r["client_s"], f"{r['client_s'] / r['floor_s']:.2f}x floor"),
            (f"{label}: client, per site (s)", r["client_per_site_s"], ""),
            (f"{label}: server (s)", r["server_s"], f"{r['server_s'] / r['floor_s']:.2f}x floor"),
            (f"{label}: whole round (s)", r["round_s"], f"{r['round_s'] / r['floor_s']:.2f}x floor"),
            (
                f"{label}: required public-key work: 2 X25519 + 1 Ed25519 check per site and neighbour (s)",
                r["public_key_s"],
                f"{r['public_key_s'] / r['floor_s']:.2f}x floor",
            ),
            (
                f"{label}: keystream + required public-key work (s)",
                r["floor_s"] + r["public_key_s"],
                f"{(r['floor_s'] + r['public_key_s']) / r['floor_s']:.2f}x floor",
            ),
            (
                f"{label}: whole round / (keystream + required public-key work)",
                r["round_s"] / (r["floor_s"] + r["public_key_s"]),
                "",
            ),
            (f"{label}: plain numpy sum (s)", r["plain_s"], ""),
            (f"{label}: cost over the plain sum (s)", r["round_s"] - r["plain_s"], ""),
        ]
        rows += [
            (f"{label}: step {step}, all calls (s)", t, f"{t / r['floor_s']:.2f}x floor") for step, t in r["steps"].items()
        ]
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:80s} {value:>10.4g}  {ratio}")
