"""Running a consortium: ``demo``, ``simulate``, and a run's control: ``show``, ``halt``, ``resume``."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import Exit

from consortium.cli.common import JsonOpt, err_console, out_console
from consortium.cli.summary import train
from consortium.config import (
    DataConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    SimulationConfig,
    load_config,
)
from consortium.data import BUILTIN_DATASETS
from consortium.errors import ConfigError, UnknownDatasetError


def _run(config: SimulationConfig, out: Path | None, as_json: bool) -> None:
    from consortium.run.simulation import (
        Simulation,  # heavy imports only once arguments are valid
    )

    simulation = Simulation(config, out=out)  # every input check happens here, before any output
    train(simulation.run, config.rounds, as_json, before=simulation.warnings)


class Backend(str, Enum):
    in_process = "in-process"
    ray = "ray"


class PrivacyLevel(str, Enum):
    record = "record"
    site = "site"


def demo(
    dataset: Annotated[str, typer.Option(help=f"one of {', '.join(BUILTIN_DATASETS)}")] = "breast-cancer",
    sites: Annotated[int, typer.Option(min=1, max=10_000, help="number of simulated sites")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=100_000, help="federated rounds")] = 20,
    seed: Annotated[int, typer.Option(min=0, help="seed for data split, initial model and training")] = 0,
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/<time>-<dataset>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary on stdout, nothing else")] = False,
    secure_aggregation: Annotated[
        bool,
        typer.Option(
            "--secure-aggregation/--no-secure-aggregation",
            help="SecAgg+: the coordinator learns only sums (on by default; turning it off is insecure)",
        ),
    ] = True,
    differential_privacy: Annotated[
        bool,
        typer.Option(
            "--differential-privacy/--no-differential-privacy",
            help="record-level DP-SGD at every site, within each site's own budget (on by default)",
        ),
    ] = True,
    epsilon: Annotated[
        float, typer.Option(min=0.01, max=1000, help="each site's privacy budget for the whole run (delta 1e-5)")
    ] = 8.0,
    privacy_level: Annotated[
        PrivacyLevel,
        typer.Option(help="record: DP-SGD protects each patient; site: DP-FedAvg protects each institution's update"),
    ] = PrivacyLevel.record,
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy",
            help="run it as a real deployment on 127.0.0.1: a CA and kits, a coordinator service and one process per site (mutual TLS)",
        ),
    ] = False,
) -> None:
    """Simulate a consortium on a built-in dataset and compare it with training alone and pooled
    (with --deploy: the same consortium as real processes talking HTTPS)."""
    if dataset not in BUILTIN_DATASETS:
        raise UnknownDatasetError(f"unknown dataset '{dataset}': choose one of {', '.join(BUILTIN_DATASETS)}")
    config = SimulationConfig(
        seed=seed,
        rounds=rounds,
        data=DataConfig(dataset=dataset, sites=sites),
        secure_aggregation=SecureAggregationConfig(enabled=secure_aggregation),
        privacy=PrivacyConfig(enabled=differential_privacy, epsilon=epsilon, level=privacy_level.value),
    )
    if deploy:
        from consortium.deploy.local import deploy_demo
        from consortium.runs import new_run_dir

        run_dir = out if out is not None else new_run_dir(Path("runs"), f"{dataset}-deployed-seed{seed}")
        err_console.print(f"deploying on 127.0.0.1: kits, CA and site data in {run_dir}-consortium, the run in {run_dir}")
        code = deploy_demo(config.resolved(), run_dir, as_json=as_json)
        if code:
            raise Exit(code)
        return
    _run(config, out, as_json)


def simulate(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="simulation config (see examples/)")],
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/<time>-<dataset>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary on stdout, nothing else")] = False,
    backend: Annotated[
        Backend | None,
        typer.Option(help="who plays the sites: in-process (one after another) or ray (a pool of Ray workers); default: the config's"),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="with --backend ray: an existing Ray cluster (auto, host:port, ray://host:10001); default: a local Ray")
    ] = None,
) -> None:
    """Run the simulation a config file describes."""
    config = load_config(config_file)
    if backend is not None:
        config = config.model_copy(update={"backend": backend.value})
    if ray_address is not None:
        if config.backend != "ray":
            raise ConfigError("--ray-address is for the Ray backend: add --backend ray, or set backend: ray in the config")
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"address": ray_address})})
    _run(config, out, as_json)


def show(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    member: Annotated[str, typer.Option(help="the member asking: what it sees is what its role may see")],
) -> None:
    """A run's summary as one member may see it: the agreement's exposure matrix decides (JSON)."""
    from consortium.run.control import member_view

    sys.stdout.write(json.dumps(member_view(run_dir, member), indent=1) + "\n")


KeysOpt = Annotated[Path, typer.Option(help="the folder of the members' identity key files, <member>.key")]


def halt(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder held to an agreement")],
    member: Annotated[str, typer.Option(help="the member who halts the run (a coordinator, site or auditor)")],
    reason: Annotated[str, typer.Option(help="why: it goes in the transcript for every member to read")],
    keys: KeysOpt,
) -> None:
    """Halt a run: a signed halt entry in its transcript; only a quorum of approvers can resume it."""
    from consortium.run.control import halt_run

    entry = halt_run(run_dir, keys, member, reason)
    out_console.print(
        f"[bold red]halted[/] {run_dir} by {member} (transcript entry {entry.index}): {reason.strip()}; "
        "resuming needs the agreement's quorum of approvers (consortium resume)"
    )


def resume(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a halted run folder")],
    keys: KeysOpt,
    approver: Annotated[list[str], typer.Option(help="an approver who signs the resume; repeat for each")],
    as_json: JsonOpt = False,
) -> None:
    """Resume a halted run with a quorum of approvers' signatures, then train its remaining rounds."""
    from consortium.run.control import resume_run
    from consortium.runs import CHECKPOINT

    entry, report = resume_run(run_dir, keys, approver)
    approvers = ", ".join(sorted(entry.body["approvals"]))
    err_console.print(f"resumed {run_dir}: the halt in entry {entry.body['halt_entry']} is ended by {approvers} (entry {entry.index})")
    if report.final_model_sha256 is not None or not (run_dir / f"{CHECKPOINT}.json").exists():
        if as_json:
            sys.stdout.write(json.dumps({"run_dir": str(run_dir), "resumed": True, "continued": False}) + "\n")
        else:
            out_console.print("nothing left to train: the run had finished before it was halted")
        return
    from consortium.run.simulation import continue_run

    remaining = load_config(run_dir / "config.yaml").rounds - report.rounds
    train(lambda on_round: continue_run(run_dir, keys, on_round=on_round), remaining, as_json)
