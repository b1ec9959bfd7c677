"""A real deployment on one machine: a provisioned consortium, and its members as separate processes.

``consortium demo --deploy`` and the end-to-end tests use it. Everything is
what a real consortium does, on 127.0.0.1: ``provision_local`` creates the CA
and the kits, has every approver sign the agreement with the identity key of
its own kit, and gives each site its CSV and the agreed schema;
``launch`` starts ``consortium serve`` with the coordinator's kit and one
``consortium join`` per site with that site's kit and data. Only the signing
is done in one place here, because every member's kit is on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from consortium.crypto.keyfile import load_identity_key
from consortium.data import Table, schema_of, write_csv, write_schema
from consortium.deploy.provision import provision
from consortium.config import SimulationConfig
from consortium.errors import ConfigError
from consortium.governance import policy as site_policy
from consortium.governance.agreement import load_agreement, parse_agreement, sign_agreement, signatures_path
from consortium.protocol.coordinator import COORDINATOR
from consortium.runs import write_atomic


@dataclass(frozen=True)
class LocalConsortium:
    folder: Path
    sites: list[str]
    port: int

    def kit(self, member: str) -> Path:
        return self.folder / "kits" / member

    def data(self, site: str) -> Path:
        return self.folder / "data" / f"{site}.csv"

    @property
    def schema(self) -> Path:
        return self.folder / "data" / "schema.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def provision_local(
    folder: Path, tables: dict[str, Table], *, consortium: str = "demo", port: int | None = None, terms: dict[str, Any] | None = None
) -> LocalConsortium:
    """Kits for a coordinator on 127.0.0.1 and one site per table, a signed agreement in every kit,
    and each site's table as its CSV beside the agreed schema. ``terms`` replace the template
    agreement's (top-level keys; a mapping is merged one level down) before anyone signs."""
    port = port or free_port()
    sites = list(tables)
    provision(folder, sites=sites, coordinator_address=f"127.0.0.1:{port}", consortium=consortium)
    agreement_file = folder / "agreement.yaml"
    if terms:
        raw = yaml.safe_load(agreement_file.read_text())
        for key, value in terms.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        text = yaml.safe_dump(raw, sort_keys=False)
        agreed = parse_agreement(text, source=str(agreement_file))  # the terms must make a valid agreement
        for path in [agreement_file, *(folder / "kits" / m / "agreement.yaml" for m in [COORDINATOR, *sites])]:
            write_atomic(path, text.encode())
        for site in sites:  # each site's starting policy, as strict as the new terms
            write_atomic(folder / "kits" / site / "policy.yaml", site_policy.template(site, agreed).encode())
    agreement = load_agreement(agreement_file)
    signatures = {
        m: sign_agreement(agreement, m, load_identity_key(folder / "kits" / m / "identity.key")) for m in agreement.approvers()
    }
    signed = (json.dumps(signatures, indent=1) + "\n").encode()
    write_atomic(signatures_path(agreement_file), signed)
    for member in [COORDINATOR, *sites]:
        shutil.copy2(signatures_path(agreement_file), signatures_path(folder / "kits" / member / "agreement.yaml"))
    local = LocalConsortium(folder, sites, port)
    write_schema(schema_of(tables[sites[0]]), local.schema)
    for site, table in tables.items():
        write_csv(table, local.data(site))
    return local


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """``consortium ARGS`` as a process of its own (``subprocess.Popen``'s keywords): the one place this
    module starts a process (the test suite starts them from a pre-imported interpreter here)."""
    return subprocess.Popen([sys.executable, "-m", "consortium.cli", *args], **kwargs)


@dataclass
class Processes:
    coordinator: subprocess.Popen
    sites: dict[str, subprocess.Popen]

    def stop(self) -> None:
        for proc in [self.coordinator, *self.sites.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_site(
    local: LocalConsortium,
    site: str,
    *,
    seed: int = 0,
    test_seed: int | None = None,
    logs: Path | None = None,
    state: Path | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """One site's agent as a process of its own (``consortium join``); see ``launch``. Its output is
    appended to ``logs/<site>.log``, so a restarted agent's follows its former self's."""
    args = ["join", str(local.kit(site)), "--data", str(local.data(site)), "--schema", str(local.schema), "--seed", str(seed)]
    if test_seed is not None:
        args += ["--test-seed", str(test_seed)]
    if state is not None:
        args += ["--state", str(state / site)]
    if logs is None:
        return _spawn([*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=_ENV)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{site}.log", "ab") as sink:  # the child holds its own copy
        return _spawn([*args, *extra], stdout=sink, stderr=subprocess.STDOUT, env=_ENV)


def launch(
    local: LocalConsortium,
    config_file: Path,
    run_dir: Path,
    *,
    seed: int = 0,
    test_seed: int | None = None,
    serve_args: tuple[str, ...] = (),
    join_args: dict[str, tuple[str, ...]] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    logs: Path | None = None,
    state: Path | None = None,
    coordinator_env: dict[str, str] | None = None,
) -> Processes:
    """Start the coordinator's service and every site's agent, each a process of its own.

    The coordinator's output goes to ``stdout`` / ``stderr`` (default: this process's); each site's,
    to ``logs/<site>.log`` when ``logs`` is given, else nowhere. Each site keeps its state (its privacy
    ledger, for the whole collaboration, and its memory of the transcript) in ``state/<site>``, or by
    default in its kit. ``coordinator_env``: variables added to the coordinator's environment (a test's
    ``CONSORTIUM_CRASH_AT``, say).
    """
    coordinator = _spawn(
        ["serve", str(local.kit(COORDINATOR)), "--config", str(config_file), "--schema", str(local.schema),
         "--out", str(run_dir), "--port", str(local.port), *serve_args],
        stdout=stdout, stderr=stderr, env={**_ENV, **(coordinator_env or {})},
    )
    sites = {
        site: start_site(local, site, seed=seed, test_seed=test_seed, logs=logs, state=state, extra=(join_args or {}).get(site, ()))
        for site in local.sites
    }
    return Processes(coordinator, sites)


def deploy_demo(config: SimulationConfig, run_dir: Path, *, as_json: bool = False) -> int:
    """``consortium demo --deploy``: the demo's consortium as real processes; the coordinator's exit code.

    The sites hold the simulation's data (the same partition, as CSVs); the agreement is the
    template, with the demo's terms (rounds, privacy level and budget, secure aggregation).
    Kits, CA and data go beside the run folder, in ``<run_dir>-consortium``.
    """
    from consortium.run.simulation import site_datasets  # the simulation's partition, nothing else of it

    if not config.privacy.enabled:
        raise ConfigError(
            "demo --deploy runs under differential privacy: in a deployment every site's own ledger refuses "
            "non-private rounds (drop --no-differential-privacy)"
        )
    folder = run_dir.with_name(run_dir.name + "-consortium")
    tables = site_datasets(config)
    pc = config.privacy
    terms = {
        "rounds": config.rounds,
        "privacy": {"level": pc.level, "max_epsilon": pc.epsilon, "delta": pc.delta},
        "secure_aggregation_required": config.secure_aggregation.enabled,
        "min_cohort": min(config.participation.min_sites, len(tables)),
    }
    local = provision_local(folder, tables, consortium="demo", terms=terms)
    config_file = folder / "run.yaml"
    write_atomic(config_file, yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False).encode())
    procs = launch(local, config_file, run_dir, seed=config.seed, serve_args=("--json",) if as_json else (), logs=folder / "logs")
    try:
        code = procs.coordinator.wait()
        for proc in procs.sites.values():
            if code == 0:  # told the run is over, each site stops by itself; after a failure nobody tells them
                proc.wait(timeout=60)
    finally:
        procs.stop()
    return code
