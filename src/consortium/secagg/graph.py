"""Neighbour graphs for SecAgg+, and the choice of degree and threshold.

In SecAgg (Bonawitz et al., CCS 2017) every site masks its update against
every other site and Shamir-shares its secrets with all of them: O(n) work
per site. SecAgg+ (Bell et al., CCS 2020) does the same on a sparse random
graph of degree k = O(log n): a site masks against, and shares its secrets
with, its k neighbours only, with a t-out-of-k threshold.

Graphs. ``complete_graph`` links every pair. ``random_regular_graph`` is
the random Harary graph of Bell et al.: the sites in a random order on a
ring, each linked to its k/2 nearest on either side (plus the opposite site
when k is odd and n even). The order must come from randomness the
coordinator cannot bias (the caller passes the generator).

Parameters (``plan_graph``). Threat model: an active coordinator that may
collude with up to a ``corruption_rate`` fraction of the sites, chosen
before the graph is drawn (c = ceil(corruption_rate * n) sites); each site
independently drops out with probability ``dropout_rate``. Each site's
secrets are shared among its k neighbours (never itself) with threshold t.

- Security, per honest site u with c_u corrupt neighbours: the coordinator
  must never hold t shares of both of u's secrets. Honest neighbours reveal
  one kind of share only, for the one survivor set they all signed in the
  consistency-check round; the c_u corrupt neighbours reveal both. Two
  conflicting views would each need t signatures, which 2t > k + c_u rules
  out (the t > (n + n_C)/2 reasoning of Bonawitz et al., Sec. 6, applied
  per neighbourhood as in Bell et al., Sec. 4); it also implies c_u < t, the
  semi-honest condition. In the random graph c_u is hypergeometric (k draws
  among the n - 1 other sites, c of them corrupt), and the plan requires
  n * P[c_u >= 2t - k] + n * (c/n + dropout_rate)^(k/2) < 2^-security_bits,
  the second term bounding the chance that corrupt or dropped sites fill
  k/2 consecutive places on the ring, the only way the honest survivors'
  graph can split (which would reveal the sums of its parts). On the
  complete graph c_u <= c holds by assumption, so t = floor((n - 1 + c)/2) + 1
  is secure outright (``security_bits`` is infinite).
- On the complete graph the failure probability is computed and reported
  (``failure_log2``) but not held to ``failure_bits``: t is fixed by
  security there, so a small consortium (3 hospitals, say) cannot meet
  2^-20 at 10% dropout with any safe threshold. Such a round aborts without
  revealing anything and can be retried.
- Failure (liveness): a round fails when some site keeps fewer than t
  surviving neighbours. Sparse: n * P[Binomial(k, dropout_rate) > k - t]
  < 2^-failure_bits (union bound over sites). Complete: exactly
  P[Binomial(n, dropout_rate) >= n - t], reported only (see below).

The plan takes the smallest even k, and for it the smallest secure t (the
most tolerant of dropouts); the complete graph when n <= complete_up_to or
when no sparse degree below n - 1 works. Tails are exact sums of the
probability mass in log space (numpy), independent of scipy.

Simplifications that remain: dropouts are independent of the graph and of
each other; a coordinator that chooses whom to drop after seeing the graph
is not covered by the union bound (the protocol should require a minimum
number of survivors and draw the graph from a seed the coordinator cannot
bias). The hypergeometric count assumes corrupt sites are fixed before the
permutation is drawn. Corrupt sites that refuse to answer act as dropouts:
fold them into ``dropout_rate`` if that is a concern. Nothing here enforces
a minimum cohort; a sum over very few honest sites reveals a lot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from consortium.errors import ConfigError

__all__ = [
    "MAX_SPARSE_DEGREE",
    "GraphPlanError",
    "GraphPlan",
    "complete_graph",
    "random_regular_graph",
    "ring_neighbours",
    "plan_graph",
]

MAX_SPARSE_DEGREE = 4096  # a plan needing more is refused rather than searched for

_LN2 = math.log(2.0)


class GraphPlanError(ConfigError):
    """A neighbour graph or SecAgg+ parameters that cannot meet the stated targets."""


# --- graphs -----------------------------------------------------------------


def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not all(isinstance(name, str) and name for name in names):
        raise GraphPlanError("site names must be non-empty strings")
    if len(set(names)) != len(names):
        raise GraphPlanError("site names must be distinct: a duplicated name would be its own neighbour")
    if len(names) < 2:
        raise GraphPlanError(f"a neighbour graph needs at least 2 sites, got {len(names)}")
    return names


def complete_graph(names: Sequence[str]) -> dict[str, frozenset[str]]:
    """Every site's neighbours are all the other sites."""
    names = _check_names(names)
    everyone = frozenset(names)
    return {name: everyone - {name} for name in names}


def _ring(names: Sequence[str], degree: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The checked names, the ring order ``rng.permutation`` gives, and the ring offsets of a site's neighbours."""
    names = _check_names(names)
    n = len(names)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or not 1 <= degree <= n - 1:
        raise GraphPlanError(f"degree must be an integer in [1, {n - 1}] for {n} sites, got {degree!r}")
    degree = int(degree)
    if degree % 2 and n % 2:
        raise GraphPlanError(f"no {degree}-regular graph on {n} sites: n x degree must be even; use degree {degree + 1}")
    half = degree // 2
    offsets = [d for d in range(1, half + 1)] + [-d for d in range(1, half + 1)]
    if degree % 2:
        offsets.append(n // 2)
    return names, rng.permutation(n), np.asarray(offsets, dtype=np.int64)


def random_regular_graph(names: Sequence[str], degree: int, rng: np.random.Generator) -> dict[str, frozenset[str]]:
    """A random Harary graph: symmetric, ``degree``-regular, no self-loops; deterministic given ``rng``.

    Sites are placed on a ring in the order ``rng.permutation`` gives; each is
    linked to the degree // 2 nearest on each side, and to the opposite site
    when ``degree`` is odd (which needs an even number of sites).
    """
    names, order, offsets = _ring(names, degree, rng)
    n = len(names)
    positions = (np.arange(n)[:, None] + offsets[None, :]) % n
    neighbour_ids = order[positions]  # row i: the neighbours of the site at ring position i
    by_name = np.asarray(names, dtype=object)
    graph = {names[order[i]]: frozenset(by_name[neighbour_ids[i]].tolist()) for i in range(n)}
    return {name: graph[name] for name in names}


def ring_neighbours(names: Sequence[str], degree: int, rng: np.random.Generator, site: str) -> frozenset[str]:
    """``site``'s neighbours in ``random_regular_graph(names, degree, rng)``, without building the others'.

    A site checking its own place needs the ring order (one permutation, O(n)) and its ``degree``
    neighbours, not the whole graph's n x degree links: the same set, for the same ``rng`` state.

    Raises:
        GraphPlanError: as ``random_regular_graph``, or ``site`` is not among ``names``.
    """
    names, order, offsets = _ring(names, degree, rng)
    n = len(names)
    try:
        at = int(np.flatnonzero(order == names.index(site))[0])
    except ValueError:
        raise GraphPlanError(f"'{site}' is not one of the graph's sites") from None
    return frozenset(names[i] for i in order[(at + offsets) % n].tolist())


# --- exact tails in log space -------------------------------------------------


def _log_comb_row(a: int, upto: int) -> np.ndarray:
    """ln C(a, j) for j = 0..upto (-inf where j > a), by a cumulative sum of ln((a - j + 1) / j)."""
    out = np.full(upto + 1, -np.inf)
    top = min(upto, a)
    j = np.arange(1, top + 1, dtype=np.float64)
    out[0] = 0.0
    out[1 : top + 1] = np.cumsum(np.log(a - j + 1.0) - np.log(j))
    return out


def _suffix_logsumexp(logs: np.ndarray) -> np.ndarray:
    """s[m] = ln sum_{i >= m} exp(logs[i]), with s[len(logs)] = -inf."""
    padded = np.append(logs, -np.inf)
    return np.logaddexp.accumulate(padded[::-1])[::-1]


def _binomial_log_tails(k: int, p: float) -> np.ndarray:
    """tails[m] = ln P[Binomial(k, p) >= m] for m = 0..k+1."""
    if p <= 0.0:
        tails = np.full(k + 2, -np.inf)
        tails[0] = 0.0
        return tails
    i = np.arange(k + 1, dtype=np.float64)
    logs = _log_comb_row(k, k) + i * math.log(p) + (k - i) * math.log1p(-p)
    return _suffix_logsumexp(logs)


def _hypergeometric_log_tails(population: int, marked: int, draws: int) -> np.ndarray:
    """tails[m] = ln P[X >= m] for m = 0..draws+1, X = marked items among ``draws`` without replacement."""
    # index i: ln C(marked, i) + ln C(population - marked, draws - i); -inf where impossible
    logs = _log_comb_row(marked, draws) + _log_comb_row(population - marked, draws)[::-1]
    total = np.logaddexp.reduce(logs)  # = ln C(population, draws), by Vandermonde's identity
    return _suffix_logsumexp(logs - total)


# --- plans ----------------------------------------------------------------------


@dataclass(frozen=True)
class GraphPlan:
    """The SecAgg+ graph and threshold for one cohort, with the guarantees it was planned for.

    ``security_bits``: -log2 of the bound on the probability that some honest
    site's secrets are exposed (infinite for the complete graph, where the
    guarantee is deterministic under the corruption assumption).
    ``failure_log2``: log2 of the bound on the probability that the round
    cannot unmask (-inf when no site drops out). The last three fields
    record the assumptions, so a site can re-derive and check the plan.
    """

    kind: Literal["complete", "k-regular"]
    degree: int
    threshold: int
    security_bits: float
    failure_log2: float
    n_sites: int
    dropout_rate: float
    corruption_rate: float

    def __post_init__(self) -> None:
        if self.kind not in ("complete", "k-regular"):
            raise GraphPlanError(f"kind must be 'complete' or 'k-regular', got {self.kind!r}")
        if not 1 <= self.threshold <= self.degree <= self.n_sites - 1:
            raise GraphPlanError(
                f"need 1 <= threshold <= degree <= n_sites - 1, got threshold {self.threshold}, "
                f"degree {self.degree}, n_sites {self.n_sites}"
            )
        if self.kind == "complete" and self.degree != self.n_sites - 1:
            raise GraphPlanError(f"a complete graph on {self.n_sites} sites has degree {self.n_sites - 1}, not {self.degree}")

    @property
    def self_ack(self) -> bool:
        """Whether a site may count its own signature of the survivor list among the ``threshold``
        acknowledgements it needs before unmasking (see ``consortium.secagg.protocol``).

        With it, two conflicting survivor lists would each need t acknowledgements counting their own
        signer: 2t > k + 1 + c rules that out, one more than without. Checked on the complete graph,
        where c is the assumed corrupt count; never on a sparse one, whose plan was made without it. It
        is what lets a small cohort lose a site after the masked inputs were sent: with it, 3 sites at
        threshold 2 finish with 2; without it each survivor has only one neighbour left to acknowledge.
        """
        if self.kind != "complete":
            return False
        corrupt = min(math.ceil(round(self.corruption_rate * self.n_sites, 9)), self.n_sites - 2, self.degree)
        return 2 * self.threshold > self.degree + 1 + corrupt

    def build(self, names: Sequence[str], rng: np.random.Generator) -> dict[str, frozenset[str]]:
        """The neighbour graph this plan was analysed for, over ``names`` (exactly ``n_sites`` of them)."""
        if len(names) != self.n_sites:
            raise GraphPlanError(f"this plan was made for {self.n_sites} sites, not {len(names)}: plan again for this cohort")
        if self.kind == "complete":
            return complete_graph(names)
        return random_regular_graph(names, self.degree, rng)


def _check_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise GraphPlanError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def _check_bits(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1024:
        raise GraphPlanError(f"{name} must be a positive number of bits, got {value!r}")
    return float(value)


def _complete_failure_log(n: int, threshold: int, dropout_rate: float) -> float:
    """ln P[round fails] on the complete graph: at most ``threshold`` survivors (n - threshold or more drop)."""
    return float(_binomial_log_tails(n, dropout_rate)[n - threshold])


def _complete_plan(n: int, corrupt: int, dropout_rate: float, corruption_rate: float, failure_bits: float) -> GraphPlan:
    degree = n - 1
    corrupt_neighbours = min(corrupt, degree)
    threshold = (degree + corrupt_neighbours) // 2 + 1  # the smallest t with 2t > k + c
    # Reported, not refused: on the complete graph the threshold is forced by security, so
    # a small consortium cannot buy liveness without giving up secrecy. A round that loses
    # too many sites aborts, reveals nothing, and can be run again.
    fail_log = _complete_failure_log(n, threshold, dropout_rate)
    return GraphPlan(
        kind="complete",
        degree=degree,
        threshold=threshold,
        security_bits=math.inf,
        failure_log2=fail_log / _LN2,
        n_sites=n,
        dropout_rate=dropout_rate,
        corruption_rate=corruption_rate,
    )


def _sparse_plan(
    n: int, corrupt: int, dropout_rate: float, corruption_rate: float, security_bits: float, failure_bits: float
) -> GraphPlan | None:
    """The smallest even degree below n - 1 (and at most MAX_SPARSE_DEGREE) with a threshold meeting both targets."""
    log_n = math.log(n)
    removed = corrupt / n + dropout_rate  # P[a ring place is corrupt or dropped], at most
    for k in range(2, min(n - 2, MAX_SPARSE_DEGREE) + 1, 2):
        exposed = _hypergeometric_log_tails(n - 1, min(corrupt, n - 1), k)
        split_log = log_n + (k // 2) * math.log(removed) if removed > 0 else -math.inf
        threshold = None
        for t in range(k // 2 + 1, k + 1):
            security_log = np.logaddexp(log_n + exposed[2 * t - k], split_log)
            if security_log < -security_bits * _LN2:
                threshold = t
                break
        if threshold is None:
            continue
        fail_log = log_n + _binomial_log_tails(k, dropout_rate)[k - threshold + 1]
        if fail_log < -failure_bits * _LN2:
            return GraphPlan(
                kind="k-regular",
                degree=k,
                threshold=threshold,
                security_bits=float(-security_log / _LN2),
                failure_log2=float(fail_log / _LN2),
                n_sites=n,
                dropout_rate=dropout_rate,
                corruption_rate=corruption_rate,
            )
    return None


def plan_graph(
    n_sites: int,
    *,
    dropout_rate: float = 0.1,
    corruption_rate: float = 0.1,
    security_bits: int = 40,
    failure_bits: int = 20,
    complete_up_to: int = 30,
) -> GraphPlan:
    """Choose the neighbour graph, degree and Shamir threshold for ``n_sites`` (see the module docstring).

    Raises ``GraphPlanError`` naming the numbers and a fix when no plan meets
    both 2^-security_bits (exposure) and 2^-failure_bits (round failure).
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 2:
        raise GraphPlanError(f"secure aggregation needs at least 2 sites, got {n_sites!r}")
    n = int(n_sites)
    dropout_rate = _check_rate("dropout_rate", dropout_rate)
    corruption_rate = _check_rate("corruption_rate", corruption_rate)
    security_bits = _check_bits("security_bits", security_bits)
    failure_bits = _check_bits("failure_bits", failure_bits)
    if isinstance(complete_up_to, bool) or not isinstance(complete_up_to, int) or complete_up_to < 0:
        raise GraphPlanError(f"complete_up_to must be a non-negative integer, got {complete_up_to!r}")
    if corruption_rate + 2 * dropout_rate >= 1:
        raise GraphPlanError(
            f"dropout_rate {dropout_rate} with corruption_rate {corruption_rate} cannot be met by any graph: "
            f"a threshold must exceed half of a site's neighbours plus the corrupt ones (~{(1 + corruption_rate) / 2:.0%}) "
            f"yet stay below the survivors (~{1 - dropout_rate:.0%}); SecAgg+ needs corruption_rate + 2 x dropout_rate < 1"
        )
    # At most n - 2 corrupt: with n - 1 colluding with the coordinator, the sum minus their
    # inputs is the last site's input, and no protocol can hide it.
    corrupt = min(math.ceil(round(corruption_rate * n, 9)), n - 2)  # round: 0.1 * 30 is 3.0000000000000004
    if n > complete_up_to:
        plan = _sparse_plan(n, corrupt, dropout_rate, corruption_rate, security_bits, failure_bits)
        if plan is not None:
            return plan
        if n - 1 > MAX_SPARSE_DEGREE:
            raise GraphPlanError(
                f"{n} sites at dropout_rate {dropout_rate} and corruption_rate {corruption_rate} would need a degree above "
                f"{MAX_SPARSE_DEGREE} to meet 2^-{security_bits:g} exposure and 2^-{failure_bits:g} failure; lower the rates or the targets"
            )
    return _complete_plan(n, corrupt, dropout_rate, corruption_rate, failure_bits)
