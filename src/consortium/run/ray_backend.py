"""The Ray backend: simulated sites played by a pool of Ray worker actors (``backend: ray``).

The in-process backend plays every site in the coordinator's own process, one
after another. This one plays them on a pool of Ray worker actors, one per CPU
by default (``ray.num_cpus`` each, as Flower's client resources), several
sites per worker: a stage's requests go out to every worker at once, and the
coordinator checks each reply as its worker's batch comes back, while the
others still work. The coordinator, its transcript and its sealed transport
are the same code as in-process and in deployment; only the ``Channel`` that
moves the sealed bytes changes (``RayChannel``).

What crosses the Ray boundary is bytes and plain values only: a worker's
specification (JSON: the config, its sites' names and budgets, and the secret
the simulated members' fresh keys derive from), ``[member, sealed bytes]``
pairs each way, and numbers. Ray frames such values with msgpack, not pickle
(``tests/test_ray_backend.py`` checks that no stage pickles). Every request a
site answers was sealed by the coordinator and every reply is sealed by its
site, exactly as over HTTPS.

A site's durable state lives in the run folder, not in its worker: its budget
ledger, its signed record and its memory of the last head it co-signed
(``run.sites``), and its data comes from the run's config and seed. A worker
that dies (killed, out of memory) is restarted by Ray and rebuilds its sites
from there; whatever a site held only in memory for the round in flight (its
secure-aggregation session) is lost, so for the coordinator the site dropped
out of that round, which the protocol tolerates. Its ledger already holds
what it paid, and it rebuilds it from its signed record if not, so no budget
is spent twice.

Ray listens on the machine's network address, not on loopback, and whoever can
talk to it can run code in the workers. A local Ray that a run starts has Ray's
token authentication on (Ray 2.60's default), so a client without the token is
refused; a run whose Ray has none says so before training and in its summary
(``RayPool.warnings``, ``auth`` in ``describe``). The sites are dealt to the
workers by training rows (``deal``), so no worker trains the largest sites alone.

On a cluster of several machines (``ray.address``) the run folder must be on
storage every node shares, and every node needs this package (and the task's
code) installed: a worker runs only code its own machine holds.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.config import SimulationConfig
from consortium.crypto import keys
from consortium.errors import ConfigError, ConsortiumError, ProtocolError
from consortium.protocol import messages as m
from consortium.protocol.site import Site
from consortium.run.plan import RunPlan
from consortium.run.sites import Budget, build_site, site_state
from consortium.transport.channel import Accept, SealedTransport
from consortium.transport.inprocess import SimulatedDropout

__all__ = ["RAY_MISSING", "RayChannel", "RayPool", "RayTransport", "SiteHost", "require_ray"]

RAY_MISSING = "the Ray backend needs Ray: pip install 'consortium[ray]' (ray 2.60), or set backend: in-process"

#: At most this many requests per call to a worker: small enough that the coordinator checks replies while
#: the workers still answer the rest of the stage, large enough that Ray's per-call cost (under a
#: millisecond) stays small beside a site's.
CHUNK = 16
#: Batches each worker has at once: one it answers, one waiting, so it never idles between them.
IN_FLIGHT = 2


#: Said before training, and in the summary's warnings, when Ray runs without its token authentication.
RAY_AUTH_OFF = (
    "the Ray {what} runs WITHOUT token authentication: whoever can reach its ports can run code in it and read "
    "every simulated site's data and every member's key; {fix}"
)


def token_auth() -> bool:
    """Whether this process talks to Ray with Ray's token authentication (``RAY_AUTH_MODE=token``): Ray 2.60 turns
    it on for a cluster ``ray.init`` starts unless ``RAY_AUTH_MODE=disabled``, and a cluster joined by address
    takes the token from ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # another Ray: what the environment asks for
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return bool(is_token_auth_enabled())


def require_ray() -> Any:
    """The ``ray`` module; ``ConfigError`` naming the install command if it is missing."""
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


class SiteHost:
    """One Ray worker: plays the sites its specification names, each built as a simulated site is.

    Args:
        spec: two JSON documents (bytes): the run's (``cwd``, ``run_dir``, the resolved ``config``, and
            ``key_secret``, hex, that every member's fresh key derives from: null under an agreement, whose
            members' key files the worker reads), and this worker's (its ``sites``, and their budgets:
            ``caps`` per site, ``delta`` and ``accountant``; null caps: no DP). Both are short whatever the
            number of sites (names and numbers, no keys), so Ray passes them inline and a restarted worker
            is built from them again.

    A problem building the sites (a task that does not load, an agreement that does not check) is kept, not
    raised, and ``ready`` returns it: Ray would otherwise restart the worker into the same failure.
    """

    def __init__(self, spec: list[bytes]) -> None:
        self._sites: dict[str, Site] = {}
        self._error: str | None = None
        self._baseline: tuple[Any, ...] = ()
        try:
            self._build(json.loads(spec[0]), json.loads(spec[1]))
        except ConsortiumError as exc:
            self._error = str(exc)

    def _build(self, run: dict[str, Any], own: dict[str, Any]) -> None:
        from consortium.governance.agreement import load_member_key
        from consortium.learning.task import load_task
        from consortium.run.orchestrator import signed_agreement
        from consortium.run.simulation import site_policies, site_splits

        os.chdir(run["cwd"])  # the config's relative paths mean what they meant to the coordinator
        config = SimulationConfig.model_validate(run["config"])
        assert config.task is not None
        task = load_task(config.task, config.model)  # this machine's own copy of the task's code
        agreement = signed_agreement(config)
        splits = site_splits(config, task)
        self._baseline = (config, task, splits)  # what local_only needs: every site's splits, for the population
        members = [*splits, m.COORDINATOR]
        if run["key_secret"] is not None:
            secret = bytes.fromhex(run["key_secret"])
            identity = {name: keys.derive_ed25519(secret, name) for name in members}
            directory = {name: keys.ed25519_public_bytes(k.public_key()) for name, k in identity.items()}
        else:  # the agreement names every member's key; each site's own is read from its key file
            assert agreement is not None and config.agreement is not None
            named = {member.name: bytes.fromhex(member.public_key) for member in agreement.members}
            directory = {name: named[name] for name in members}
            identity = {name: load_member_key(agreement, config.agreement.keys, name) for name in own["sites"]}
        policies = site_policies(config, agreement, own["sites"])
        caps = own["caps"]
        for name in own["sites"]:
            self._sites[name] = build_site(
                name, splits[name], identity=identity[name], directory=directory, state=site_state(Path(run["run_dir"]), name),
                seed=config.seed, budget=None if caps is None else Budget(caps[name], own["delta"], own["accountant"]),
                agreement=agreement, policy=policies.get(name), test_seed=config.privacy.test_seed, task=task,
                lifecycle=False,
                memory=True,  # a restarted worker's sites pick up from the last head each co-signed
            )

    def ready(self) -> str | None:
        """None once every site is built; else why they could not be."""
        return self._error

    def node(self) -> str:
        """The Ray node this worker runs on."""
        return str(require_ray().get_runtime_context().get_node_id())

    def handle(self, batch: list[list[Any]]) -> list[list[Any]]:
        """Each ``[member, sealed request]`` to its site; ``[member, sealed reply]`` for each site played here."""
        return [[member, self._sites[member].handle_bytes(raw)] for member, raw in batch if member in self._sites]

    def local_only(self, seeds: dict[str, int]) -> dict[str, list[float]]:
        """The local-only baseline of the sites named (``simulation.local_only_scores``), trained here."""
        from consortium.run.simulation import local_only_scores

        config, task, splits = self._baseline
        return local_only_scores(config, task, splits, seeds)

    def ledgers(self) -> dict[str, list[float]]:
        """Each site's ``[epsilon spent, cap]`` from its own ledger (sites without DP keep none)."""
        return {name: [s.ledger.spent(), s.ledger.epsilon_cap] for name, s in self._sites.items() if s.ledger is not None}


class RayChannel:
    """A ``Channel`` over a pool of ``SiteHost`` actors: each stage goes to every worker at once.

    ``hosts``: the workers' actor handles; ``home``: member name -> the index of the worker that plays it.
    A member with no worker does not answer. A worker lost during a stage (``RayActorError``: killed, out of
    memory) leaves its members silent, as a dropped site; Ray restarts it for the next request. A site's own
    error (a bug, not a refusal) propagates, as in process. ``lost`` counts the batches lost so.
    """

    def __init__(self, hosts: list[Any], home: Mapping[str, int]) -> None:
        self.hosts = hosts
        self.home = dict(home)
        self.lost = 0

    def handle_stage(self, requests: Mapping[str, bytes], accept: Accept) -> dict[str, m.Envelope]:
        """Every worker's share of the stage at once, in batches of at most ``CHUNK``, ``IN_FLIGHT`` batches per
        worker at a time; each reply checked as its batch comes back.

        A request is read (and so sealed) only when its batch leaves, and a worker's next batch leaves when
        one of its batches returns: the coordinator holds a few batches per worker, not the whole stage (a
        stage of 1,000 fit requests for a model of 1M parameters would be 4 GB at once).
        """
        ray = require_ray()
        queues: dict[int, deque[str]] = {}
        for member in requests:
            if member in self.home:
                queues.setdefault(self.home[member], deque()).append(member)
        owner: dict[Any, int] = {}

        def send(h: int) -> None:
            queue = queues[h]
            if queue:
                batch = [[member, requests[member]] for member in (queue.popleft() for _ in range(min(CHUNK, len(queue))))]
                owner[self.hosts[h].handle.remote(batch)] = h

        for h in queues:
            for _ in range(IN_FLIGHT):
                send(h)
        replies: dict[str, m.Envelope] = {}
        while owner:
            done, _ = ray.wait(list(owner), num_returns=1)
            send(owner.pop(done[0]))  # that worker's next batch, before this one's replies are checked
            try:
                answered = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                self.lost += 1  # the worker is gone: its members in this batch are silent
                continue
            for member, raw in answered:
                try:
                    replies[member] = accept(member, raw)
                except ProtocolError:
                    continue  # refused: recorded by the transport, counted as no answer
        return replies


class RayTransport(SealedTransport):
    """The simulation's ``SealedTransport`` over a ``RayChannel``, with the in-process backend's dropout.

    Dropout is drawn as in process (``SimulatedDropout``), request by request in the coordinator's order, so
    the same seed drops the same sites on either backend; the rest of the stage goes to the workers at once.
    """

    def __init__(
        self, channel: RayChannel, *, dropout: float = 0.0, rng: np.random.Generator | None = None,
        identity: Ed25519PrivateKey | None = None, directory: Mapping[str, bytes] | None = None,
    ) -> None:
        self._dropout = SimulatedDropout(dropout, rng)
        super().__init__(channel, identity, directory or None)
        self._members = frozenset(channel.home)

    def exchange(self, request: m.Envelope) -> m.Envelope | None:
        """One request as a stage of its own (``exchange_many``)."""
        return self.exchange_many([request])[0]

    def exchange_many(self, requests: list[m.Envelope]) -> list[m.Envelope | None]:
        """One stage through the workers; None for a member that is not played, dropped out, or was lost."""
        asked = [r for r in requests if r.recipient in self._members and not self._dropout.vanishes(r)]
        replies = dict(zip([r.recipient for r in asked], self._stage(asked))) if asked else {}
        return [replies.get(r.recipient) for r in requests]


def deal(rows: Mapping[str, int], count: int) -> dict[str, int]:
    """Which of ``count`` workers plays each site: the sites by training rows, largest first, dealt out in
    a snake (0, 1, ..., count - 1, count - 1, ..., 0, 0, ...).

    A worker plays its sites one after another, so a round lasts as long as its busiest worker. Training
    grows with a site's rows, and the protocol's work is the same for every site: each worker gets as many
    sites as any other (one fewer at most), and the snake pairs the largest with the smallest. Four
    Dirichlet-split digits sites of 387, 374, 337 and 159 rows: 546 and 711 rows (the best two-way split
    there is), where dealing them in name order gave 496 and 761. Ties go by name: the same sites, the
    same workers.
    """
    order = sorted(rows, key=lambda name: (-rows[name], name))
    lap = [*range(count), *reversed(range(count))]
    return {name: lap[i % len(lap)] for i, name in enumerate(order)}


class RayPool:
    """The workers that play a simulation's sites, started on Ray (a local Ray unless ``ray.address``).

    Args:
        plan: the run's plan (its config's ``ray`` section sizes the pool; its privacy plan gives each site's
            budget).
        run_dir: the run folder, where each site keeps its state.
        key_secret: what every member's fresh key derives from (``keys.derive_ed25519``), when the run has
            no agreement; under one, each worker reads its sites' keys from the agreement's key files.
        rows: each site's training rows, by which the sites are dealt to the workers (``deal``); default:
            in name order, as if every site had as many.

    Raises:
        ConfigError: Ray is not installed, cannot start or be reached, the pool asks for more CPUs than the
            cluster has, or a worker could not build its sites.

    ``close`` stops the workers, and the local Ray if this pool started it.
    """

    def __init__(self, plan: RunPlan, run_dir: Path, *, key_secret: bytes | None, rows: Mapping[str, int] | None = None) -> None:
        ray = require_ray()
        config, rc = plan.config, plan.config.ray
        self._started = not ray.is_initialized()
        self.hosts: list[Any] = []
        if self._started:
            try:
                ray.init(address=rc.address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {rc.address}" if rc.address else "a local Ray"
                raise ConfigError(f"could not start {where} ({exc}): check ray.address, or set backend: in-process") from None
        names = sorted(plan.names)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        count = min(len(names), rc.workers or max(1, math.floor(cpus / rc.num_cpus)))
        if count * rc.num_cpus > cpus + 1e-9:  # Ray would wait for the missing CPUs for ever
            self.close()
            raise ConfigError(
                f"ray.workers {count} x ray.num_cpus {rc.num_cpus:g} needs {count * rc.num_cpus:g} CPUs and the Ray cluster "
                f"has {cpus:g}: lower ray.workers, or give each worker a share of a CPU (ray.num_cpus: {cpus / count:.2g})"
            )
        home = deal({name: (rows or {}).get(name, 0) for name in names}, count)
        actor = ray.remote(SiteHost).options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus, max_restarts=-1, max_task_retries=0)
        run = json.dumps({
            "cwd": os.getcwd(), "run_dir": str(Path(run_dir).resolve()), "config": config.model_dump(mode="json"),
            "key_secret": None if key_secret is None else key_secret.hex(),
        }).encode()
        privacy = plan.privacy
        for h in range(count):
            mine = [name for name in names if home[name] == h]
            own = {"sites": mine, "delta": privacy.delta, "accountant": privacy.accountant,
                   "caps": {n: privacy.epsilon_caps[n] for n in mine} if privacy.enabled else None}
            self.hosts.append(actor.remote([run, json.dumps(own).encode()]))
        self.channel = RayChannel(self.hosts, home)
        errors = [e for e in ray.get([h.ready.remote() for h in self.hosts]) if e is not None]
        if errors:
            self.close()
            raise ConfigError(f"a Ray worker could not build its sites: {errors[0]}")
        auth = token_auth()
        self._where = {"kind": "ray", "workers": count, "nodes": len(set(ray.get([h.node.remote() for h in self.hosts]))),
                       "cluster": rc.address or "local", "auth": "token" if auth else "none"}
        #: What the run must say loudly: Ray's own protection of the sites' data is off.
        if auth:
            self.warnings: tuple[str, ...] = ()
        elif self._started:
            self.warnings = (RAY_AUTH_OFF.format(what="this run started on this machine", fix=(
                "unset RAY_AUTH_MODE (Ray then requires the token it keeps in ~/.ray/auth_token)")),)
        else:  # joined: ray.address, or a Ray this process had already started
            self.warnings = (RAY_AUTH_OFF.format(what=f"cluster at {rc.address}" if rc.address else "this process joined", fix=(
                "start the cluster with RAY_AUTH_MODE=token and give this machine its token (RAY_AUTH_MODE=token here too), "
                "or keep it on a network only you reach")),)

    def describe(self) -> dict[str, Any]:
        """Where the sites ran, for the run's summary: the workers, the Ray nodes they ran on, the cluster, and
        whether Ray's token authentication guards it (``auth``: ``token`` or ``none``)."""
        return dict(self._where)

    def local_only(self, seeds: Mapping[str, int]) -> Callable[[], dict[str, list[float]]]:
        """Start each site's local-only baseline on the worker that plays it (all workers at once); the
        returned call waits for them and gives ``{site: [population score, own score]}``."""
        ray = require_ray()
        home = self.channel.home
        pending = [
            h.local_only.remote({n: s for n, s in seeds.items() if home[n] == i}) for i, h in enumerate(self.hosts)
        ]

        def gather() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {}
            for part in ray.get(pending):
                out.update(part)
            return out

        return gather

    def ledgers(self) -> dict[str, list[float]]:
        """Each site's ``[epsilon spent, cap]``, as its worker reads its ledger."""
        out: dict[str, list[float]] = {}
        for part in require_ray().get([h.ledgers.remote() for h in self.hosts]):
            out.update(part)
        return out

    def close(self) -> None:
        """Stop the workers (their sites' state is in the run folder), and the local Ray this pool started."""
        ray = require_ray()
        for host in self.hosts:
            ray.kill(host, no_restart=True)
        self.hosts = []
        if self._started:
            ray.shutdown()
