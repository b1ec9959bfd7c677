"""A real deployment: ``init`` (the CA and kits), ``serve`` (the coordinator), ``join`` (a site) and
``dashboard-link``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from consortium.cli.common import JsonOpt, err_console, out_console
from consortium.cli.summary import train
from consortium.config import load_config
from consortium.errors import ConfigError


def init(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="a new folder for the CA, the manifest and the kits")],
    sites: Annotated[str, typer.Option(help="comma-separated site names")],
    coordinator: Annotated[str, typer.Option(help="the coordinator's address, HOST:PORT")],
    auditors: Annotated[str, typer.Option(help="comma-separated auditor names")] = "",
    consortium: Annotated[str, typer.Option(help="the consortium's name")] = "consortium",
    days: Annotated[int, typer.Option(help="certificate validity in days")] = 365,
) -> None:
    """Provision a consortium: a CA, and for each member a kit (certificate, keys, manifest, agreement)."""
    from consortium.deploy.provision import provision

    done = provision(
        folder, sites=[s.strip() for s in sites.split(",") if s.strip()], coordinator_address=coordinator,
        consortium=consortium, auditors=[a.strip() for a in auditors.split(",") if a.strip()], days=days,
    )
    members = done.manifest["members"]
    assert isinstance(members, dict)
    out_console.print(
        f"provisioned {consortium}: CA {folder / 'ca.crt'} (its key {folder / 'ca.key'} stays with you), "
        f"{len(members)} kits under {folder / 'kits'}; give each member its own kit only. "
        f"Next: every approver signs its kit's agreement (consortium agreement sign KIT/agreement.yaml --member NAME "
        f"--key KIT/identity.key), then consortium agreement collect {folder} puts every signature in every kit."
    )


def serve(
    kit_dir: Annotated[Path, typer.Argument(metavar="KIT", help="the coordinator's kit folder (from consortium init)")],
    schema: Annotated[Path | None, typer.Option(help="the agreed data schema every site's CSV follows")] = None,
    sample: Annotated[
        Path | None, typer.Option(help="instead of --schema, for a task that loads its sites' data: examples in their layout (public or generated) its load reads; only the layout is kept")
    ] = None,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="the run's config: model, training, privacy, rounds")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/<time>-coordinator-served)")] = None,
    recover: Annotated[
        Path | None, typer.Option(help="continue the run in this folder after the coordinator stopped (crash, kill)")
    ] = None,
    state_url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL of the coordinator's state (default: SQLite in the run folder)")
    ] = None,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="the port (default: the kit's)")] = None,
    wait_for_sites: Annotated[float, typer.Option(help="seconds to wait for every site to connect")] = 300.0,
    stage_timeout: Annotated[float, typer.Option(help="seconds a stage waits for a site's answer before it counts as dropped")] = 120.0,
    pickup_timeout: Annotated[
        float, typer.Option(help="seconds a stage waits for a site to take its request before it counts as gone")
    ] = 15.0,
    dashboard_port: Annotated[
        int | None, typer.Option(help="serve the read-only dashboard on this port (members open it with consortium dashboard-link)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Coordinate a run as an HTTPS service (mutual TLS); sites connect with consortium join."""
    from consortium.data import load_schema
    from consortium.deploy.provision import load_kit
    from consortium.deploy.serve import ServedRun

    if recover is not None and (config_file is not None or out is not None):
        raise ConfigError("--recover continues a run under the config it recorded, in its folder: drop --config and --out")
    served = ServedRun(
        load_kit(kit_dir), None if config_file is None else load_config(config_file),
        None if schema is None else load_schema(schema), sample=sample,
        out=recover if recover is not None else out, recover=recover is not None, state_url=state_url, host=host, port=port,
        stage_timeout_s=stage_timeout, pickup_timeout_s=pickup_timeout, dashboard_port=dashboard_port,
    )
    err_console.print(f"coordinator listening on https://{host}:{port or served.kit.port}, waiting for {', '.join(served.names)}")
    served.start(wait_for_sites_s=wait_for_sites)
    if served.dashboard_port is not None:
        err_console.print(f"dashboard on https://{host}:{served.dashboard_port}/dashboard (consortium dashboard-link KIT)")
    try:
        train(served.run, served.config.rounds, as_json, before=served.plan.warnings)
    finally:
        served.stop()


def dashboard_link(
    kit_dir: Annotated[Path, typer.Argument(metavar="KIT", help="your kit folder: the link is signed with its identity key")],
    port: Annotated[int, typer.Option(help="the dashboard's port (serve --dashboard-port)")],
    hours: Annotated[float, typer.Option(min=0.01, max=24, help="how long the link works (the dashboard accepts at most 24 h)")] = 8.0,
) -> None:
    """Print a link to the coordinator's dashboard, signed by you; it shows what your role may see."""
    from consortium.crypto.keyfile import load_identity_key
    from consortium.deploy.dashboard import grant
    from consortium.deploy.provision import load_kit

    kit = load_kit(kit_dir)
    token = grant(kit.member, load_identity_key(kit.folder / "identity.key"), seconds=hours * 3600)
    out_console.print(f"https://{kit.host}:{port}/dashboard?token={token}", soft_wrap=True, highlight=False)


def join(
    kit_dir: Annotated[Path, typer.Argument(metavar="KIT", help="this site's kit folder (from consortium init)")],
    data: Annotated[Path, typer.Option(help="this site's CSV (or what its task's load reads); it never leaves this machine")],
    schema: Annotated[Path | None, typer.Option(help="the agreed data schema the CSV follows (not for a task that loads its data)")] = None,
    state: Annotated[Path | None, typer.Option(help="this site's state folder, its privacy ledger (default: KIT/state)")] = None,
    seed: Annotated[int, typer.Option(min=0, help="seed of this site's splits and training (the run's seed reproduces a simulation)")] = 0,
    test_seed: Annotated[
        int | None, typer.Option(min=0, help="TEST MODE: a fixed seed for the privacy noise, reproducible and NOT private")
    ] = None,
    coordinator: Annotated[str | None, typer.Option(help="the coordinator's URL (default: the address in the kit)")] = None,
    crash_at: Annotated[str | None, typer.Option(hidden=True, help="fault injection for tests: KIND:ROUND")] = None,
    incoming: Annotated[
        Path | None, typer.Option(help="records that reached this site since training (same schema): what its drift check reads")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="the study's task as the run's config names it (module:Class or file.py:Class), run from this machine's copy")
    ] = None,
) -> None:
    """Take part in a run (or a model-lifecycle session) as a site: poll the coordinator over mutual TLS and
    answer with this site's runtime."""
    from consortium.deploy.agent import SiteAgent
    from consortium.deploy.join import build_site
    from consortium.deploy.provision import load_kit

    kit = load_kit(kit_dir)
    fault = None
    if crash_at is not None:
        kind, _, rnd = crash_at.partition(":")
        if not rnd.isdigit():
            raise ConfigError(f"--crash-at '{crash_at}' is not KIND:ROUND, for example secagg_deliver:2")
        fault = (kind, int(rnd))
    site = build_site(kit, data, schema, state=state, seed=seed, test_seed=test_seed, crash_at=fault, incoming=incoming, task=task)
    if test_seed is not None:
        err_console.print("[bold red]WARNING[/]: privacy noise is in TEST MODE (fixed seed): reproducible, and NOT private")
    for d in site.restored:  # its ledger had lost or changed rows this site signed as paid: put back before anything runs
        err_console.print(f"[bold red]ledger restored[/]: {d} -> the signed event is counted again", highlight=False, soft_wrap=True)
    agent = SiteAgent(kit, site, base_url=coordinator)
    err_console.print(f"{kit.member} joined: polling {agent.base_url}")
    agent.run()
    spent = site.ledger.spent() if site.ledger is not None else 0.0
    out_console.print(f"{kit.member}: the run is over; answered {agent.answered} requests; epsilon spent so far {spent:.4g}")
