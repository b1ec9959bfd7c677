"""``consortium join KIT --data CSV --schema SCHEMA``: a site's agent, next to its data.

The site is the simulation's own ``Site`` (guard, budget ledger, transcript
checks and all), built here from the site's kit and its CSV: its identity key
and the agreement from the kit, its stricter policy from the kit's
``policy.yaml``, and its privacy ledger in its own state folder, where it
persists across runs (the budget is for the whole collaboration). The agent
only ever connects out, to the coordinator's address in the kit. The state
folder also keeps the last transcript head the site co-signed, so an agent
restarted mid-run checks the next head against it and carries on.

Reproducibility: the site's splits and training seed come from ``seed`` and
its name (``consortium.run.simulation.site_randomness``), exactly as in
simulation; ``test_seed`` makes its privacy noise reproducible too, and is
for tests only: a site in test mode is not private, and says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from consortium.config import SplitConfig
from consortium.data import load_schema, read_csv, split_table
from consortium.deploy.provision import Kit
from consortium.deploy.serve import directory_of
from consortium.errors import ConfigError
from consortium.governance.agreement import load_agreement, load_member_key, read_signatures, require_approval
from consortium.governance.guard import epsilon_cap
from consortium.governance.policy import load_policy
from consortium.privacy.ledger import BudgetLedger
from consortium.protocol import messages as m
from consortium.protocol.site import Site
from consortium.run.simulation import noise_test_seed, site_randomness
from consortium.transcript.site_record import RECORD_FILE

LEDGER_FILE = "budget.sqlite"
MEMORY_FILE = "transcript-memory.json"  # the last head this site co-signed: a restarted agent picks up from it


JOURNAL_FILE = "evaluation.jsonl"
LIFECYCLE_FILE = "lifecycle.json"
PRIVATE_FILES = (LEDGER_FILE, JOURNAL_FILE)  # created here, before their writers open them; the others are written atomically


def private_state(state: Path) -> None:
    """The site's state folder and its files, for the site's eyes only: the folder 0700, the files 0600.

    Its ledger (what the site spent), its evaluation journal (how each model did on its own test split)
    and its transcript memory are site-only. The ledger and the journal are created here, 0600, before
    SQLite and the journal append to them (SQLite gives its WAL files the database's mode); files written
    atomically (the memory, the lifecycle state) start as 0600 temporary files. Existing ones are
    tightened; nothing else in the folder is touched."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)
    for name in PRIVATE_FILES:
        os.close(os.open(state / name, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (*PRIVATE_FILES, f"{LEDGER_FILE}-wal", f"{LEDGER_FILE}-shm", MEMORY_FILE, LIFECYCLE_FILE):
        path = state / name
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o600)


class CrashingSite(Site):
    """Fault injection for tests (``consortium join --crash-at KIND:ROUND``): the process dies, with no
    goodbye, on receiving the first request of ``kind`` in ``round``, as a site whose machine fails."""

    def __init__(self, *args: Any, crash_at: tuple[str, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._crash_at = crash_at

    def handle(self, request: m.Envelope) -> m.Envelope:
        if (request.message.kind, request.round) == self._crash_at:
            os._exit(137)  # what SIGKILL leaves: no reply, no cleanup
        return super().handle(request)


def build_site(
    kit: Kit,
    data: Path,
    schema: Path,
    *,
    state: Path | None = None,
    seed: int = 0,
    test_seed: int | None = None,
    split: SplitConfig = SplitConfig(),
    crash_at: tuple[str, int] | None = None,
    incoming: Path | None = None,
) -> Site:
    """The site runtime this kit's member runs on its own CSV; every input is checked first."""
    if kit.role != "site":
        raise ConfigError(f"{kit.folder} is the kit of {kit.role} '{kit.member}': only a site's kit joins with data")
    agreement_file = kit.folder / "agreement.yaml"
    agreement = load_agreement(agreement_file)
    require_approval(agreement, read_signatures(agreement_file))  # a site takes part only under a signed agreement
    policy_file = kit.folder / "policy.yaml"
    policy = load_policy(policy_file, agreement) if policy_file.exists() else None
    if policy is not None and policy.site != kit.member:
        raise ConfigError(f"{policy_file}: the policy is for site '{policy.site}', not '{kit.member}': fix its site field")
    data_schema = load_schema(schema)
    table = read_csv(data, data_schema)
    split_rng, train_seed = site_randomness(seed, kit.member)
    splits = split_table(table, split_rng, validation=split.validation, test=split.test)
    identity = load_member_key(agreement, None, kit.member, file=kit.folder / "identity.key")
    state = state if state is not None else kit.folder / "state"
    private_state(state)
    ledger = BudgetLedger(state / LEDGER_FILE, site=kit.member, epsilon_cap=epsilon_cap(agreement, policy), delta=agreement.privacy.delta)
    extra: dict[str, Any] = {} if crash_at is None else {"crash_at": crash_at}
    site = (Site if crash_at is None else CrashingSite)(
        kit.member,
        splits,
        seed=train_seed,
        identity=identity,
        directory=directory_of(agreement),
        ledger=ledger,
        noise_test_seed=None if test_seed is None else noise_test_seed(test_seed, kit.member),
        strict=True,
        agreement=agreement,
        policy=policy,
        memory=state / MEMORY_FILE,
        journal=state / JOURNAL_FILE,  # how each round's model did on this site's own test split
        lifecycle=state / LIFECYCLE_FILE,  # the model version this site runs, and its drift checks
        record=state / RECORD_FILE,  # every head it co-signed and decision it signed: its anchor and its ledger's
        **extra,
    )
    if incoming is not None:  # the records that reached the site since training: its drift check's input
        site.observe(read_csv(incoming, data_schema))
    return site
