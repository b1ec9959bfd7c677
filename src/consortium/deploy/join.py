"""``consortium join KIT --data CSV --schema SCHEMA``: a site's agent, next to its data.

The site is the simulation's own ``Site`` (guard, budget ledger, transcript
checks and all), built by the same factory (``consortium.run.sites.build_site``)
from the site's kit and its CSV: its identity key and the agreement from the
kit, its stricter policy from the kit's ``policy.yaml``, and its privacy
ledger in its own state folder, where it persists across runs (the budget is for the whole collaboration). The agent
only ever connects out, to the coordinator's address in the kit. The state
folder also keeps the last transcript head the site co-signed, so an agent
restarted mid-run checks the next head against it and carries on.

Reproducibility: the site's splits and training seed come from ``seed`` and
its name (``consortium.run.sites.site_randomness``), exactly as in
simulation; ``test_seed`` makes its privacy noise reproducible too, and is
for tests only: a site in test mode is not private, and says so.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from consortium.config import SplitConfig
from consortium.data import load_schema, read_csv, split_table
from consortium.deploy.provision import Kit
from consortium.deploy.serve import directory_of
from consortium.errors import ConfigError, DataError
from consortium.governance.agreement import load_agreement, load_member_key, read_signatures, require_approval
from consortium.governance.approval import require_reference_approved
from consortium.governance.guard import epsilon_cap
from consortium.governance.policy import load_policy
from consortium.learning.task import load_task
from consortium.protocol import messages as m
from consortium.protocol.site import Site
from consortium.run.sites import (  # the state folder's file names and its privacy, kept importable from here
    JOURNAL_FILE as JOURNAL_FILE,
    LEDGER_FILE as LEDGER_FILE,
    LIFECYCLE_FILE as LIFECYCLE_FILE,
    MEMORY_FILE as MEMORY_FILE,
    PRIVATE_FILES as PRIVATE_FILES,
    Budget,
    private_state as private_state,
    site_randomness,
)
from consortium.run.sites import build_site as build_site_from


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
    schema: Path | None,
    *,
    state: Path | None = None,
    seed: int = 0,
    test_seed: int | None = None,
    split: SplitConfig = SplitConfig(),
    crash_at: tuple[str, int] | None = None,
    incoming: Path | None = None,
    task: str | None = None,
) -> Site:
    """The site runtime this kit's member runs on its own CSV; every input is checked first.

    The kit-and-CSV front end of ``consortium.run.sites.build_site``: the site keeps its ledger, evaluation
    journal, lifecycle state, signed record and transcript memory in ``state``, private to it.

    Args:
        kit: the site's kit (its identity key, the signed agreement, its own ``policy.yaml`` if any).
        data: the site's CSV, or what its task's ``load`` reads (a folder of images, an array file).
        schema: the CSV's schema file (None only for a task that loads its data itself).
        state: the site's state folder (default: ``state/`` in the kit's folder).
        seed: the run's seed: the site's splits and training seed are drawn from it and its name.
        test_seed: test mode only (not private): makes the site's privacy noise reproducible.
        split: the validation and test shares of the site's data.
        crash_at: fault injection for tests: die on the first request of this (kind, round).
        incoming: a CSV of the records that reached the site since training (its drift check's input).
        task: the study's task as the run's config names it (loaded from this machine's own copy of its
            code); default: the built-in task for the data's labels.

    Returns:
        The site, ready for its agent to connect out to the coordinator.

    Raises:
        ConfigError: the kit is not a site's, the agreement is unsigned, the policy is another site's, the
            task's code is not one the agreement accepts and the site approved (or changed since: the file
            that differs is named), or the data, schema, key or budget is not usable.
        OSError: the state folder cannot be created.
    """
    if kit.role != "site":
        raise ConfigError(f"{kit.folder} is the kit of {kit.role} '{kit.member}': only a site's kit joins with data")
    agreement_file = kit.folder / "agreement.yaml"
    agreement = load_agreement(agreement_file)
    require_approval(agreement, read_signatures(agreement_file))  # a site takes part only under a signed agreement
    policy_file = kit.folder / "policy.yaml"
    policy = load_policy(policy_file, agreement) if policy_file.exists() else None
    if policy is not None and policy.site != kit.member:
        raise ConfigError(f"{policy_file}: the policy is for site '{policy.site}', not '{kit.member}': fix its site field")
    if task is not None and ":" in task:  # a study's code: hashed and checked against the approvals before any of it runs
        require_reference_approved(task, kit.member, agreement, policy)
    study = load_task(task) if task is not None else None
    if study is not None and study.loads_data:  # the study's own reader, on this machine's own files
        if incoming is not None:
            raise ConfigError("--incoming is read against a schema: a task that loads its own data has none")
        table = study.records(data)
    elif schema is None:
        raise ConfigError("give --schema, the agreed schema the CSV follows (only a task that loads its data needs none)")
    else:
        table = read_csv(data, load_schema(schema))
    if study is None:
        study = load_task("classification" if table.classes else "regression")
    split_rng, _ = site_randomness(seed, kit.member)
    try:
        splits = split_table(table, split_rng, validation=split.validation, test=split.test)
    except DataError as exc:  # say whose data, and where it was read from
        raise DataError(f"site '{kit.member}' ({data}): {exc}") from None
    identity = load_member_key(agreement, None, kit.member, file=kit.folder / "identity.key")
    site = build_site_from(
        kit.member,
        splits,
        identity=identity,
        directory=directory_of(agreement),
        state=state if state is not None else kit.folder / "state",
        seed=seed,
        budget=Budget(epsilon_cap(agreement, policy), agreement.privacy.delta),
        agreement=agreement,
        policy=policy,
        test_seed=test_seed,
        task=study,  # this site's own copy of the task: it refuses a request or a manifest for another
        memory=True,  # the last head it co-signed: a restarted agent picks up from it
        private=True,  # its state folder and files are its own: 0700 / 0600
        make=Site if crash_at is None else functools.partial(CrashingSite, crash_at=crash_at),
    )
    if incoming is not None:  # the records that reached the site since training: its drift check's input
        assert schema is not None
        site.observe(read_csv(incoming, load_schema(schema)))
    return site
