"""The one place a ``Site`` is built: from what a site has, wherever it runs.

The simulation, the lifecycle manager (which rebuilds a simulated run's sites)
and ``consortium join`` (a deployed site next to its data) all build their
sites here, so the wiring is written once: where each state file lives, the
budget ledger and its cap, the evaluation journal, the signed record, the
transcript memory, the lifecycle state and the strict (deployment-grade)
checks. A site's state folder holds, each under its fixed name::

    budget.sqlite            its privacy budget ledger (under DP)
    evaluation.jsonl         how each round's model did on its own test split
    lifecycle.json           the model version it runs, and its drift checks
    signed-record.jsonl      every head it co-signed and decision it signed
    transcript-memory.json   the last head it co-signed (when asked: deployed agents restart)

A site's randomness comes from the run's seed and its name alone
(``site_randomness``, ``noise_test_seed``), so a site process given the same
seed (``consortium join --seed``) draws exactly what its simulated twin draws.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.data import Splits
from consortium.governance.agreement import Agreement
from consortium.governance.policy import SitePolicy
from consortium.learning.task import Task
from consortium.privacy.accountant import Accountant
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol.site import Site
from consortium.protocol.trainer import LocalTrainer
from consortium.transcript.site_record import RECORD_FILE

__all__ = [
    "JOURNAL_FILE", "LEDGER_FILE", "LIFECYCLE_FILE", "MEMORY_FILE", "PRIVATE_FILES", "RECORD_FILE",
    "Budget", "build_site", "noise_test_seed", "private_state", "site_randomness", "site_state",
]

LEDGER_FILE = "budget.sqlite"
MEMORY_FILE = "transcript-memory.json"  # the last head this site co-signed: a restarted agent picks up from it
JOURNAL_FILE = "evaluation.jsonl"
LIFECYCLE_FILE = "lifecycle.json"
PRIVATE_FILES = (LEDGER_FILE, JOURNAL_FILE)  # created before their writers open them; the others are written atomically

#: What builds the site object from its name, its splits and ``Site``'s keyword arguments:
#: ``Site`` itself, or a subclass (a red-team attacker, a site that crashes on cue).
SiteMaker = Callable[..., Site]


def _name_tag(site: str) -> int:
    return int.from_bytes(hashlib.sha256(site.encode()).digest()[:8], "big")


def site_randomness(seed: int, site: str) -> tuple[np.random.Generator, int]:
    """A site's own randomness in a run with ``seed``.

    Args:
        seed: the run's seed.
        site: the site's name.

    Returns:
        The generator that splits the site's data, and its training seed. From the seed and the
        site's name alone, so a site process (``consortium join --seed``) draws what the same site
        draws in simulation, whoever else takes part.
    """
    split_seq, train_seq = np.random.SeedSequence([seed, _name_tag(site)]).spawn(2)
    return np.random.default_rng(split_seq), int(train_seq.generate_state(1)[0])


def noise_test_seed(test_seed: int, site: str) -> int:
    """A site's privacy-noise seed in test mode (reproducible and NOT private).

    Args:
        test_seed: the run's test-mode seed.
        site: the site's name.

    Returns:
        The seed of this site's privacy noise, from the test seed and its name alone.
    """
    return int(np.random.SeedSequence([test_seed, _name_tag(site), 0xD9]).generate_state(1)[0])


def site_state(run_dir: Path, site: str) -> Path:
    """A simulated site's state folder: ``RUN_DIR/sites/<site>/`` (its ledger, journal, record, lifecycle state).

    Args:
        run_dir: the run folder.
        site: the site's name.

    Returns:
        The folder (it may not exist yet; the files' writers create it).
    """
    return Path(run_dir) / "sites" / site


def private_state(state: Path) -> None:
    """The site's state folder and its files, for the site's eyes only: the folder 0700, the files 0600.

    Its ledger (what the site spent), its evaluation journal (how each model did on its own test split)
    and its transcript memory are site-only. The ledger and the journal are created here, 0600, before
    SQLite and the journal append to them (SQLite gives its WAL files the database's mode); files written
    atomically (the memory, the lifecycle state) start as 0600 temporary files. Existing ones are
    tightened; nothing else in the folder is touched.

    Args:
        state: the site's state folder (created if missing).

    Raises:
        OSError: the folder or its files cannot be created or their modes set.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    for name in PRIVATE_FILES:
        os.close(os.open(state / name, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (*PRIVATE_FILES, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", MEMORY_FILE, LIFECYCLE_FILE):
        path = state / name
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600)


@dataclass(frozen=True)
class Budget:
    """A site's privacy budget: the most epsilon its ledger lets it spend, at ``delta``, under ``accountant``.

    ``epsilon_cap`` is the site's effective cap: under an agreement alone
    ``consortium.governance.guard.epsilon_cap`` (the agreement's, or the site's stricter policy's).
    """

    epsilon_cap: float
    delta: float
    accountant: Accountant = "pld"


def build_site(
    name: str,
    splits: Splits,
    *,
    identity: Ed25519PrivateKey,
    directory: Mapping[str, bytes],
    state: Path,
    seed: int,
    budget: Budget | None,
    agreement: Agreement | None = None,
    policy: SitePolicy | None = None,
    test_seed: int | None = None,
    task: Task | None = None,
    trainer: LocalTrainer | None = None,
    journal: bool = True,
    record: bool = True,
    lifecycle: bool = True,
    memory: bool = False,
    private: bool = False,
    make: SiteMaker = Site,
) -> Site:
    """One institution's ``Site``, wired to its keys and its state folder, with deployment-grade checks.

    The site is strict (every request sealed by the coordinator, every reply sealed by the site, each
    round's plan proven by the transcript before training). Its state files live in ``state`` under
    this module's fixed names; each kind can be left out where a caller keeps none.

    Args:
        name: the site's name.
        splits: its train / validation / test splits (never handed out).
        identity: its Ed25519 identity key.
        directory: every member's public key, the coordinator's included.
        state: its state folder.
        seed: the run's seed; the site's training seed is drawn from it and the name (``site_randomness``).
        budget: its privacy budget; a ledger ``budget.sqlite`` keeps it (None: no DP, no ledger).
        agreement: the agreement the site takes part under, if any.
        policy: the site's own, stricter policy, if any.
        test_seed: test mode only (not private): the run's noise seed, from which the site's is drawn.
        task: the study's task, from this machine's own copy of its code (None: the built-in classifier).
        trainer: the site's local training (None: plain; record-level DP is always DP-SGD).
        journal: keep the evaluation journal ``evaluation.jsonl``.
        record: keep the signed record ``signed-record.jsonl``.
        lifecycle: keep the lifecycle state ``lifecycle.json``.
        memory: keep the transcript memory ``transcript-memory.json`` (a restarted agent resumes from it).
        private: make the folder and its files the site's own first (``private_state``: 0700 / 0600).
        make: builds the object from ``(name, splits, **Site's keyword arguments)``: ``Site`` or a subclass.

    Returns:
        The site, ready to answer the coordinator.

    Raises:
        ConfigError: the budget's cap is not positive, or is looser than the agreement and policy allow,
            or the policy is another site's.
        ProtocolError: ``make`` built a site without the keys strict checks need.
        OSError: the state folder or a state file cannot be created.
    """
    if private:
        private_state(state)
    ledger = None if budget is None else BudgetLedger(
        state / LEDGER_FILE, site=name, epsilon_cap=budget.epsilon_cap, delta=budget.delta, accountant=budget.accountant,
    )
    return make(
        name,
        splits,
        seed=site_randomness(seed, name)[1],
        identity=identity,
        directory=directory,
        ledger=ledger,
        noise_test_seed=None if test_seed is None else noise_test_seed(test_seed, name),
        strict=True,
        task=task,
        agreement=agreement,
        policy=policy,
        memory=state / MEMORY_FILE if memory else None,
        journal=state / JOURNAL_FILE if journal else None,
        lifecycle=state / LIFECYCLE_FILE if lifecycle else None,
        record=state / RECORD_FILE if record else None,
        trainer=trainer,
    )
