"""The ``consortium`` command.

Every error a user can cause ends as one line on stderr naming the problem
and the fix, exit code 2, and no traceback. ``--json`` prints exactly one
JSON object on stdout; progress and warnings go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table as RichTable
from typer.exceptions import Abort, Exit, TyperException

from consortium.config import (
    DataConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    SimulationConfig,
    load_config,
)
from consortium.data import BUILTIN_DATASETS
from consortium.errors import ConfigError, ConsortiumError, UnknownDatasetError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Consortium: train one model across institutions that never reveal their raw data.",
)
out_console = Console()
err_console = Console(stderr=True)


def _run(config: SimulationConfig, out: Path | None, as_json: bool) -> None:
    from consortium.simulation import (
        Simulation,  # heavy imports only once arguments are valid
    )

    simulation = Simulation(config, out=out)  # every input check happens here, before any output
    _train(simulation.run, config.rounds, as_json)


#: The exit code of a run that halted on an incident (2 is a usage or input error).
HALTED_EXIT = 3


def _train(run: Any, rounds: int, as_json: bool) -> None:
    """Run with a progress bar on stderr, then print the summary; a halted run exits with HALTED_EXIT."""
    show_progress = not as_json or err_console.is_terminal
    with Progress(
        TextColumn("[bold]training[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds  acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=not show_progress,
        transient=False,
    ) as progress:
        task = progress.add_task("rounds", total=rounds, acc="-")

        def on_round(record: Any) -> None:
            acc = record.metrics.get("accuracy")
            progress.update(task, advance=1, acc="-" if acc is None else f"{acc:.3f}")

        result = run(on_round=on_round)
    summary = result.summary
    for warning in summary["warnings"]:
        err_console.print(f"[bold red]WARNING[/]: {warning}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    else:
        _print_table(summary)
    halt = summary.get("halt")
    if halt is not None:
        where = f" (site {halt['site']})" if halt.get("site") else ""
        err_console.print(
            f"[bold red]RUN HALTED[/] in round {halt['round']}: {halt['cause']}{where}: {halt['detail']}. "
            f"Nothing more runs until a quorum of approvers resumes it: consortium resume {summary['run_dir']} --keys DIR "
            "--approver NAME ...",
            highlight=False, soft_wrap=True,
        )
        raise Exit(HALTED_EXIT)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def _print_table(s: dict[str, Any]) -> None:
    t = RichTable(title=f"{s['dataset']}: {s['sites']} sites, {s['rounds']} rounds (scored on every site's test split)")
    t.add_column("training")
    for col in ("accuracy", "loss", "auc"):
        t.add_column(col, justify="right")
    fed = s["federated"]
    t.add_row("[bold]federated (consortium)[/]", _fmt(fed.get("accuracy")), _fmt(fed.get("loss")), _fmt(fed.get("auc")))
    if "local_only" in s:
        lo = s["local_only"]
        t.add_row("local-only, mean of sites", _fmt(lo["accuracy_mean"]), "", "")
        for name, acc in lo["accuracy_per_site"].items():
            own = lo["own_split_accuracy_per_site"][name]
            t.add_row(f"  {name} alone (own split {_fmt(own)})", _fmt(acc), "", "")
    if "pooled" in s:
        p = s["pooled"]
        t.add_row("pooled (simulation-only upper bound)", _fmt(p.get("accuracy")), _fmt(p.get("loss")), _fmt(p.get("auc")))
    out_console.print(t)
    quality = [f"expected calibration error {fed['ece']:.3f}"] if fed.get("ece") is not None else []
    if fed.get("site_accuracy_std") is not None:
        quality.append(f"accuracy across sites {fed['site_accuracy_mean']:.3f} +- {fed['site_accuracy_std']:.3f} (from sums)")
    for key, label in (("demographic_parity_gap", "demographic parity gap"), ("equalized_odds_gap", "equalised odds gap"),
                       ("shift_accuracy", "accuracy under the declared shift")):
        if fed.get(key) is not None:
            quality.append(f"{label} {fed[key]:.3f}")
    if quality:
        out_console.print("beyond accuracy: " + "; ".join(quality))
    sa = s["secure_aggregation"]
    if sa["enabled"]:
        per_round = sa["survivors_per_round"]
        out_console.print(
            f"secure aggregation: on ({sa['graph']} graph, threshold {sa['threshold']}, "
            f"{min(per_round, default=0)}-{max(per_round, default=0)} sites summed per round); "
            "the coordinator saw sums only"
        )
    else:
        out_console.print("[bold red]secure aggregation: OFF[/] (the coordinator saw every site's update)")
    pv = s["privacy"]
    if pv["enabled"]:
        # What a site may have spent, rounds whose answer was lost included: never below any ledger.
        spent = max((pv.get("epsilon_bound_per_site") or pv["epsilon_per_site"]).values(), default=0.0)
        if pv["level"] == "record":
            how = (
                f"record level, DP-SGD (noise multiplier {pv['noise_multiplier']:.3f}, clip {pv['clip']:g}, "
                f"sampling rate {pv['sampling_rate']:g})"
            )
        else:
            where = "added by the sites inside secure aggregation" if pv["noise"] == "distributed" else "[bold red]added by the coordinator[/]"
            how = (
                f"site level, DP-FedAvg ({pv['noise']} noise {where}, multiplier {pv['noise_multiplier']:.3f} "
                f"for {pv['cohort']} honest sites, update clip {pv['clip']:g}{', adaptive' if pv['adaptive_clipping'] else ''})"
            )
        out_console.print(
            f"differential privacy: {how}; epsilon spent per site up to {spent:.3f} of {pv['target_epsilon']:g} "
            f"at delta {pv['delta']:g} ({pv['accountant']})" + ("; local-only and pooled rows are NOT private" if "pooled" in s or "local_only" in s else "")
        )
        if pv["refusals"]:
            out_console.print(f"rounds refused for lack of budget: {pv['refusals']}")
    else:
        out_console.print("[bold red]differential privacy: OFF[/] (no formal guarantee for any record)")
    skipped = fed.get("rounds_skipped", 0)
    if skipped:
        out_console.print(f"{skipped} round(s) skipped for lack of answers: see metrics.jsonl")
    tr = s.get("transcript")
    if tr:
        out_console.print(
            f"transcript: {tr['entries']} signed entries, tree head {tr['tree_head']['root'][:16]}... co-signed by "
            f"{len(tr['tree_head']['cosigners'])} of {s['sites']} sites, {'verified' if tr['verified'] else 'NOT verified'} "
            f"(check it yourself: consortium verify {s['run_dir']})"
        )
    out_console.print(f"run folder: {s['run_dir']}")


class PrivacyLevel(str, Enum):
    record = "record"
    site = "site"


@app.command()
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


@app.command()
def simulate(
    config_file: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="simulation config (see examples/)")],
    out: Annotated[Path | None, typer.Option(help="run folder (default: runs/<time>-<dataset>)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON summary on stdout, nothing else")] = False,
) -> None:
    """Run the simulation a config file describes."""
    _run(load_config(config_file), out, as_json)


privacy_app = typer.Typer(help="Differential-privacy accounting (dp-accounting): epsilon from noise, noise from epsilon.")
app.add_typer(privacy_app, name="privacy")

class AccountantChoice(str, Enum):
    pld = "pld"
    rdp = "rdp"


AccountantOpt = Annotated[AccountantChoice, typer.Option("--accountant", help="pld (reported figures) or rdp")]
SamplingOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Poisson sampling probability per record and step")]
StepsOpt = Annotated[int, typer.Option(min=1, help="number of DP-SGD steps")]
DeltaOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="target delta")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object")]


def _report(inputs: dict[str, Any], key: str, value: float, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps({**inputs, key: value}) + "\n")
    else:
        out_console.print(text)


# Both commands use dp-accounting's own PLD resolution (1e-4), so a figure matches calling it directly.


@privacy_app.command("epsilon")
def privacy_epsilon(
    noise_multiplier: Annotated[float, typer.Option(min=0.0, help="Gaussian noise std / clip")],
    sampling_rate: SamplingOpt,
    steps: StepsOpt,
    delta: DeltaOpt,
    accountant: AccountantOpt = AccountantChoice.pld,
    as_json: JsonOpt = False,
) -> None:
    """Epsilon of DP-SGD (Poisson-subsampled Gaussian) after STEPS steps."""
    from consortium.privacy.accountant import dp_sgd_epsilon

    acc = accountant.value
    eps = dp_sgd_epsilon(
        noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, delta=delta,
        accountant=acc, pld_interval=1e-4,  # type: ignore[arg-type]
    )
    inputs = {"noise_multiplier": noise_multiplier, "sampling_rate": sampling_rate, "steps": steps, "delta": delta, "accountant": acc}
    _report(inputs, "epsilon", eps, as_json, f"epsilon = {eps:.4f} at delta = {delta:g} ({acc})")


@privacy_app.command("calibrate")
def privacy_calibrate(
    epsilon: Annotated[float, typer.Option(min=0.0, help="target epsilon")],
    delta: DeltaOpt,
    steps: StepsOpt,
    sampling_rate: SamplingOpt,
    accountant: AccountantOpt = AccountantChoice.pld,
    as_json: JsonOpt = False,
) -> None:
    """The smallest noise multiplier that keeps DP-SGD within EPSILON."""
    from consortium.privacy.accountant import calibrate_noise

    acc = accountant.value
    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps,
        accountant=acc, pld_interval=1e-4,  # type: ignore[arg-type]
    )
    inputs = {"epsilon": epsilon, "delta": delta, "steps": steps, "sampling_rate": sampling_rate, "accountant": acc}
    _report(inputs, "noise_multiplier", sigma, as_json, f"noise multiplier = {sigma:.4f}")


StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="a site's state folder: its ledger, and its own record of the heads it co-signed"),
]


def _reconciled(run_dir: Path, state: Path | None) -> tuple[dict[str, Any], str | None]:
    """The ledgers (the run's own, or the one in ``state``) reconciled with the decisions each site signed in
    the run's transcript, when the transcript verifies; otherwise the ledgers alone and why."""
    from consortium.errors import VerificationError
    from consortium.privacy.ledger import read_ledgers
    from consortium.transcript.site_record import transcript_payments
    from consortium.transcript.verify import read_entries, verify_run

    paths = None if state is None else [state / "budget.sqlite"]
    try:
        verify_run(run_dir)
    except VerificationError as exc:
        return read_ledgers(run_dir, paths=paths), f"the transcript does not verify ({exc}): the ledgers are not reconciled with it"
    entries = read_entries(run_dir)
    sites = [n for n, m in (entries[0].body.get("members") or {}).items() if m.get("role") == "site"]
    return read_ledgers(run_dir, paths=paths, signed={s: transcript_payments(entries, s) for s in sites}), None


def _print_discrepancies(rows: dict[str, Any]) -> bool:
    """Name each ledger row that disagrees with what its site signed; whether any row was deleted or edited."""
    broken = False
    for site, r in rows.items():
        for d in r.get("discrepancies", []):
            broken |= d["kind"] != "unsigned"
            line = f"{site}: run {d['run'][:12]} round {d['round']}: {d['detail']}"
            err_console.print(("[bold red]ledger[/] " if d["kind"] != "unsigned" else "note: ") + line, highlight=False, soft_wrap=True)
    return broken


@app.command()
def budget(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    state: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Epsilon spent by each site against its own cap, read from the sites' ledgers and reconciled with the
    privacy events each site signed in the transcript. Exits 1 when a ledger row was deleted or edited."""
    rows, unreconciled = _reconciled(run_dir, state)
    if unreconciled:
        err_console.print(f"[yellow]{unreconciled}[/]", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), "sites": rows, "reconciled": unreconciled is None}) + "\n")
    else:
        t = RichTable(title=f"privacy budget: {run_dir}")
        for col in ("site", "epsilon spent", "cap", "delta", "rounds paid"):
            t.add_column(col, justify="left" if col == "site" else "right")
        for name, r in rows.items():
            t.add_row(name, f"{r['epsilon_spent']:.4f}", f"{r['epsilon_cap']:g}", f"{r['delta']:g}", str(r["rounds_paid"]))
        out_console.print(t)
    if _print_discrepancies(rows):
        raise Exit(1)


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    agreement: Annotated[Path | None, typer.Option(help="the signed agreement you hold: the anchor for every key")] = None,
    kit: Annotated[Path | None, typer.Option(help="your member kit: its agreement, keys and (a site's) record")] = None,
    state: StateOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a run: signatures, Merkle tree, co-signed heads, epsilon, summary, model; anchored in what you hold.

    Without --agreement, --kit or --state the check is for consistency only, and says so. With --state, the
    site's ledger is also reconciled with what it signed. Exits 0 when every check passes, 1 naming the first
    violation.
    """
    from consortium.errors import VerificationError
    from consortium.transcript.anchor import CONSISTENCY_ONLY, agreement_anchor, kit_anchor, state_anchor
    from consortium.transcript.verify import verify_run

    anchors = [
        *([agreement_anchor(agreement)] if agreement is not None else []),
        *([kit_anchor(kit)] if kit is not None else []),
        *([state_anchor(state)] if state is not None else []),
    ]
    try:
        report = verify_run(run_dir, anchors=anchors)
        rows = _reconciled(run_dir, state)[0] if state is not None and (state / "budget.sqlite").exists() else {}
        deleted = [d for r in rows.values() for d in r.get("discrepancies", []) if d["kind"] != "unsigned"]
        if deleted:
            raise VerificationError(f"the ledger in {state} disagrees with what its site signed: " + "; ".join(
                f"run {d['run'][:12]} round {d['round']}: {d['detail']}" for d in deleted))
    except VerificationError as exc:
        if as_json:
            sys.stdout.write(json.dumps({"run_dir": str(run_dir), "verified": False, "violation": str(exc)}) + "\n")
        else:
            err_console.print(f"[bold red]verification failed[/]: {exc}", highlight=False, soft_wrap=True)
        raise Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), **report.to_json()}) + "\n")
        return
    head = report.tree_head
    out_console.print(
        f"[bold green]verified[/]: {report.entries} entries over {report.rounds} rounds, every one signed by its author; "
        f"{report.heads} tree heads signed by the coordinator and co-signed by {len(head['cosigned_by'])} sites; "
        f"tree head {head['size']} {head['root'][:16]}..."
    )
    if report.summary == "missing":
        err_console.print("[yellow]no summary.json[/]: the run's report is missing, so none of its figures were checked")
    else:
        out_console.print("summary.json is this run's: its run id, tree head, target epsilon, epsilon and metrics match signed entries")
    if report.epsilon_per_site:
        eps = ", ".join(f"{s} {e:.3f}" for s, e in report.epsilon_per_site.items())
        said = "matching the run's report" if report.summary == "bound" else "(no report to compare with)"
        out_console.print(f"epsilon recomputed from the events each site signed, {said}: {eps}")
        higher = {s: b for s, b in report.epsilon_bound_per_site.items() if b > report.epsilon_per_site.get(s, 0.0) + 1e-12}
        if higher:  # rounds a site was asked to join whose answer was lost: it may have paid them
            bound = ", ".join(f"{s} {b:.3f}" for s, b in higher.items())
            out_console.print(f"[yellow]at most[/], counting rounds whose answer was lost (the site may have paid them): {bound}")
    if report.final_model_sha256:
        out_console.print(f"final model file matches the transcript: sha256 {report.final_model_sha256[:16]}...")
    if report.lineage is not None:
        out_console.print("model lineage, every state change signed and in order:")
        for v in report.lineage.registry.versions.values():
            out_console.print(f"  {v.id} ({v.parent or 'the run'} -> {v.id}) {v.state}: {v.history[-1].reason}", highlight=False)
        running = {ver for ver in report.lineage.deployed.values()}
        where = ", ".join(f"{s} {ver or '-'}" for s, ver in report.lineage.deployed.items())
        out_console.print(f"  sites run: {where}" + (" (all on one version)" if len(running) == 1 else ""))
        if report.registry_stale:
            err_console.print("registry.json is behind the transcript (a write was cut short): consortium models list rebuilds it")
    for line in report.anchored_by:
        out_console.print(f"[bold green]anchored[/]: {line}", highlight=False)
    if not report.anchored_by:
        err_console.print(f"[bold yellow]{CONSISTENCY_ONLY}[/]", highlight=False, soft_wrap=True)


agreement_app = typer.Typer(help="The consortium agreement: write one, check it, explain it in plain language.")
app.add_typer(agreement_app, name="agreement")


@agreement_app.command("init")
def agreement_init(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="where to write the agreement (YAML)")],
    sites: Annotated[str, typer.Option(help="the sites' names, comma-separated")],
    consortium: Annotated[str, typer.Option(help="the consortium's name")] = "consortium",
) -> None:
    """Write a starting agreement with every protection on; edit it, then have every approver sign it."""
    from consortium.governance.agreement import agreement_hash, parse_agreement, template
    from consortium.runs import write_atomic

    if path.exists():
        raise ConfigError(f"{path} already exists: an agreement is never overwritten (approvers may have signed it)")
    names = [s.strip() for s in sites.split(",") if s.strip()]
    text = template(consortium, names)
    agreement = parse_agreement(text, source=str(path))  # the template must itself be valid
    write_atomic(path, text.encode())
    out_console.print(f"wrote {path}: {len(agreement.members)} members, agreement hash {agreement_hash(agreement)[:16]}...")


@agreement_app.command("check")
def agreement_check(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="an agreement file")],
    as_json: JsonOpt = False,
) -> None:
    """Validate an agreement, print its hash (what approvers sign) and who has signed this version."""
    from consortium.governance.agreement import agreement_hash, approval, load_agreement, read_signatures

    agreement = load_agreement(path)
    digest = agreement_hash(agreement)
    signed, missing = approval(agreement, read_signatures(path))
    if as_json:
        sys.stdout.write(json.dumps(
            {"path": str(path), "valid": True, "sha256": digest, "signed": signed, "missing": missing, "approved": not missing}
        ) + "\n")
        return
    out_console.print(f"{path}: valid; agreement hash {digest}")
    out_console.print(
        f"signed by {', '.join(signed) or 'nobody yet'}; "
        + (f"[bold red]still to sign: {', '.join(missing)}[/] (no run may start)" if missing else "approved by every approver")
    )


@agreement_app.command("sign")
def agreement_sign(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="an agreement file")],
    member: Annotated[str, typer.Option(help="the signing member's name, as the agreement lists it")],
    key: Annotated[Path, typer.Option(help="that member's identity key file (consortium key new)")],
) -> None:
    """Sign the agreement's hash with a member's identity key; the signature goes beside the agreement."""
    from consortium.crypto.keyfile import load_identity_key
    from consortium.governance.agreement import approval, load_agreement, read_signatures, sign_agreement, signatures_path
    from consortium.runs import write_atomic

    agreement = load_agreement(path)
    signatures = {**read_signatures(path), member: sign_agreement(agreement, member, load_identity_key(key))}
    _, missing = approval(agreement, signatures)
    write_atomic(signatures_path(path), (json.dumps(signatures, indent=1, sort_keys=True) + "\n").encode())
    out_console.print(f"{member} signed {path}; " + (f"still to sign: {', '.join(missing)}" if missing else "every approver has signed"))


key_app = typer.Typer(help="Identity keys: one Ed25519 key per member, in a file only its owner can read.")
app.add_typer(key_app, name="key")


@key_app.command("new")
def key_new(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="where to write the private key (mode 0600)")],
    as_json: JsonOpt = False,
) -> None:
    """Create a member's identity key and print the public key to put in the agreement."""
    from consortium.crypto import keys
    from consortium.crypto.keyfile import save_identity_key

    private, public = keys.generate_ed25519()
    save_identity_key(path, private)
    hex_key = keys.ed25519_public_bytes(public).hex()
    if as_json:
        sys.stdout.write(json.dumps({"path": str(path), "public_key": hex_key}) + "\n")
        return
    out_console.print(f"wrote {path} (mode 0600); public key: {hex_key}")


@agreement_app.command("explain")
def agreement_explain(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="an agreement file")],
    markdown: Annotated[Path | None, typer.Option(help="also write the explanation to this Markdown file")] = None,
) -> None:
    """The exposure matrix and the privacy promises, in plain language for a privacy officer."""
    from consortium.governance.agreement import explain, load_agreement
    from consortium.runs import write_atomic

    text = explain(load_agreement(path))
    if markdown is not None:
        write_atomic(markdown, text.encode())
    sys.stdout.write(text)


policy_app = typer.Typer(help="A site's own policy: kept at the site, never looser than the agreement.")
app.add_typer(policy_app, name="policy")
AgreementOpt = Annotated[Path, typer.Option(help="the consortium agreement the policy must be stricter than")]


@policy_app.command("init")
def policy_init(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="where to write the policy (YAML)")],
    site: Annotated[str, typer.Option(help="the site the policy is for, as the agreement names it")],
    agreement: AgreementOpt,
) -> None:
    """Write a starting policy that repeats the agreement's terms, for the site to tighten."""
    from consortium.governance.agreement import load_agreement
    from consortium.governance.policy import parse_policy, template
    from consortium.runs import write_atomic

    if path.exists():
        raise ConfigError(f"{path} already exists: edit it, or remove it first")
    ag = load_agreement(agreement)
    text = template(site, ag)
    parse_policy(text, ag, source=str(path))  # the template must itself be valid
    write_atomic(path, text.encode())
    out_console.print(f"wrote {path}: {site}'s policy, as strict as the agreement; tighten it as the site requires")


@policy_app.command("check")
def policy_check(
    path: Annotated[Path, typer.Argument(metavar="PATH", help="a site policy file")],
    agreement: AgreementOpt,
    as_json: JsonOpt = False,
) -> None:
    """Validate a site policy and check that it is no looser than the agreement."""
    from consortium.governance.agreement import load_agreement
    from consortium.governance.policy import load_policy

    policy = load_policy(path, load_agreement(agreement))
    if as_json:
        sys.stdout.write(json.dumps({"path": str(path), "valid": True, "policy": policy.model_dump()}) + "\n")
        return
    out_console.print(f"{path}: valid, and no looser than {agreement} for site {policy.site}")


@app.command()
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
        f"Next: every approver signs {folder / 'agreement.yaml'} (consortium agreement sign)."
    )


@app.command()
def serve(
    kit_dir: Annotated[Path, typer.Argument(metavar="KIT", help="the coordinator's kit folder (from consortium init)")],
    schema: Annotated[Path, typer.Option(help="the agreed data schema every site's CSV follows")],
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
        load_kit(kit_dir), None if config_file is None else load_config(config_file), load_schema(schema),
        out=recover if recover is not None else out, recover=recover is not None, state_url=state_url,
        host=host, port=port, stage_timeout_s=stage_timeout, pickup_timeout_s=pickup_timeout, dashboard_port=dashboard_port,
    )
    err_console.print(f"coordinator listening on https://{host}:{port or served.kit.port}, waiting for {', '.join(served.names)}")
    served.start(wait_for_sites_s=wait_for_sites)
    if served.dashboard_port is not None:
        err_console.print(f"dashboard on https://{host}:{served.dashboard_port}/dashboard (consortium dashboard-link KIT)")
    try:
        _train(served.run, served.config.rounds, as_json)
    finally:
        served.stop()


@app.command("dashboard-link")
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


@app.command()
def join(
    kit_dir: Annotated[Path, typer.Argument(metavar="KIT", help="this site's kit folder (from consortium init)")],
    data: Annotated[Path, typer.Option(help="this site's CSV; it never leaves this machine")],
    schema: Annotated[Path, typer.Option(help="the agreed data schema the CSV follows")],
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
    site = build_site(kit, data, schema, state=state, seed=seed, test_seed=test_seed, crash_at=fault, incoming=incoming)
    if test_seed is not None:
        err_console.print("[bold red]WARNING[/]: privacy noise is in TEST MODE (fixed seed): reproducible, and NOT private")
    for d in site.restored:  # its ledger had lost or changed rows this site signed as paid: put back before anything runs
        err_console.print(f"[bold red]ledger restored[/]: {d} -> the signed event is counted again", highlight=False, soft_wrap=True)
    agent = SiteAgent(kit, site, base_url=coordinator)
    err_console.print(f"{kit.member} joined: polling {agent.base_url}")
    agent.run()
    spent = site.ledger.spent() if site.ledger is not None else 0.0
    out_console.print(f"{kit.member}: the run is over; answered {agent.answered} requests; epsilon spent so far {spent:.4g}")


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    member: Annotated[str, typer.Option(help="the member asking: what it sees is what its role may see")],
) -> None:
    """A run's summary as one member may see it: the agreement's exposure matrix decides (JSON)."""
    from consortium.governance.control import member_view

    sys.stdout.write(json.dumps(member_view(run_dir, member), indent=1) + "\n")


KeysOpt = Annotated[Path, typer.Option(help="the folder of the members' identity key files, <member>.key")]


@app.command()
def halt(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder held to an agreement")],
    member: Annotated[str, typer.Option(help="the member who halts the run (a coordinator, site or auditor)")],
    reason: Annotated[str, typer.Option(help="why: it goes in the transcript for every member to read")],
    keys: KeysOpt,
) -> None:
    """Halt a run: a signed halt entry in its transcript; only a quorum of approvers can resume it."""
    from consortium.governance.control import halt_run

    entry = halt_run(run_dir, keys, member, reason)
    out_console.print(
        f"[bold red]halted[/] {run_dir} by {member} (transcript entry {entry.index}): {reason.strip()}; "
        "resuming needs the agreement's quorum of approvers (consortium resume)"
    )


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a halted run folder")],
    keys: KeysOpt,
    approver: Annotated[list[str], typer.Option(help="an approver who signs the resume; repeat for each")],
    as_json: JsonOpt = False,
) -> None:
    """Resume a halted run with a quorum of approvers' signatures, then train its remaining rounds."""
    from consortium.governance.control import resume_run
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
    from consortium.simulation import continue_run

    remaining = load_config(run_dir / "config.yaml").rounds - report.rounds
    _train(lambda on_round: continue_run(run_dir, keys, on_round=on_round), remaining, as_json)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a finished run's folder")],
    attacks: Annotated[str, typer.Option("--attacks", help="comma-separated: mia, inversion, canary, poisoning")] = "mia",
    shadows: Annotated[int, typer.Option("--shadows", min=2, max=1024, help="LiRA's shadow models (even)")] = 16,
    canaries: Annotated[int, typer.Option("--canaries", min=10, max=1_000_000, help="the one-run audit's canaries")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="the red team's own randomness")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Attack a finished run's model and data the way an adversary would; writes RUN_DIR/audit.json.

    mia: membership inference (loss threshold; LiRA with shadow models that replay the run), each site's
    members against its held-out records, TPR at low FPR against the ceiling the run's epsilon sets.
    inversion: gradient inversion of one round's update, one site's against the secure sum's, with the run's DP.
    canary: the one-run DP audit (Steinke et al.) of the run's DP-SGD, and of a deliberately broken copy.
    poisoning: the run replayed with a malicious site (scaling, sign flip, backdoor), undefended and defended.
    """
    from consortium.redteam.audit import AuditOptions, parse_attacks, run_audit

    names = parse_attacks(attacks)
    with err_console.status(f"red team: {', '.join(names)} against {run_dir}"):
        result = run_audit(run_dir, names, AuditOptions(shadows=shadows, seed=seed, canaries=canaries))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    _print_audit(result, names)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder")],
    compare: Annotated[
        list[Path] | None, typer.Option("--compare", help="another run folder, shown side by side (repeatable)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="the HTML file to write (default: RUN_DIR/report.html)")] = None,
) -> None:
    """Write one self-contained HTML page: accuracy, epsilon per site, the red team's findings, verification."""
    from consortium.redteam.report import write_report

    written = write_report([run_dir, *(compare or [])], out)
    out_console.print(f"written: {written}")


models_app = typer.Typer(help="The model lifecycle: versions, canary evaluation, staged rollout, rollback, drift.")
app.add_typer(models_app, name="models")
VersionArg = Annotated[str, typer.Argument(metavar="VERSION", help="a model version, e.g. v2")]
RunArg = Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a completed run held to an agreement with lifecycle terms")]


def _lineage(run_dir: Path) -> Any:
    """The run's model lineage as its transcript has it (verified); the registry index is brought up to date."""
    from consortium.lifecycle.registry import ModelRegistry
    from consortium.transcript.verify import verify_run

    report = verify_run(run_dir)
    if report.lineage is None:
        raise ConfigError(
            f"{run_dir} has no model versions: a run registers its final model when its agreement sets lifecycle terms"
        )
    if report.registry_stale:
        ModelRegistry(run_dir).rebuild(report.lineage.registry.versions)
    return report.lineage


SimKeysOpt = Annotated[Path | None, typer.Option("--keys", help="a simulated run: the folder of every member's key file")]
KitOpt = Annotated[
    Path | None, typer.Option("--kit", help="a deployed run: the coordinator's kit; it serves, and the sites' agents join")
]
SchemaOpt = Annotated[Path | None, typer.Option("--schema", help="with --kit: the agreed data schema")]
WaitOpt = Annotated[float, typer.Option("--wait-for-sites", min=1, help="with --kit: seconds to wait for every site's agent")]


@contextmanager
def _reopened(run_dir: Path, keys: Path | None, kit: Path | None, schema: Path | None, wait: float,
              incoming: list[str] | None = None) -> Iterator[Any]:
    """The run reopened for the lifecycle: simulated (every member's key at hand) or by its deployed coordinator."""
    from consortium.lifecycle.manager import open_lifecycle, read_incoming

    if (keys is None) == (kit is None):
        raise ConfigError(
            "pass --keys DIR (a simulated run: every member's key) or --kit KIT --schema SCHEMA (a deployed run: "
            "its coordinator serves, and each site joins with consortium join)"
        )
    if kit is None:
        assert keys is not None
        yield open_lifecycle(run_dir, keys, incoming=read_incoming(run_dir, incoming or []))
        return
    from consortium.deploy.provision import load_kit
    from consortium.deploy.serve import serve_lifecycle

    if schema is None:
        raise ConfigError("--kit needs --schema: the agreed data schema the sites' data follows")
    if incoming:
        raise ConfigError("--incoming names a simulated site's records: a deployed site reads its own (consortium join --incoming CSV)")
    with serve_lifecycle(load_kit(kit), run_dir, schema, wait_for_sites_s=wait) as lc:
        err_console.print(f"every site joined: {', '.join(lc.names)}")
        yield lc


@models_app.command("list")
def models_list(run_dir: RunArg, as_json: JsonOpt = False) -> None:
    """Every model version: its state, parent, round, metrics, privacy cost and the sites running it."""
    lineage = _lineage(run_dir)
    if as_json:
        sys.stdout.write(json.dumps({"run_dir": str(run_dir), **lineage.to_json()}) + "\n")
        return
    t = RichTable(title=f"model versions of {run_dir}")
    for col in ("version", "state", "parent", "round", "accuracy", "ECE", "max epsilon", "running on"):
        t.add_column(col, justify="left" if col in ("version", "state", "running on") else "right")
    for v in lineage.registry.versions.values():
        running = sorted(s for s, ver in lineage.deployed.items() if ver == v.id)
        eps = max(v.epsilon.values()) if v.epsilon else None
        t.add_row(
            v.id, v.state, v.parent or "-", str(v.round), _fmt(v.metrics.get("accuracy")), _fmt(v.metrics.get("ece")),
            _fmt(eps), ", ".join(running) or "-",
        )
    out_console.print(t)
    for site, info in lineage.to_json()["open_drift_incidents"].items():
        out_console.print(f"[bold yellow]promotion paused[/]: {site} reported drift in {', '.join(info['features']) or 'its label rates'} (entry {info['entry']})")


@models_app.command("show")
def models_show(run_dir: RunArg, version: VersionArg, as_json: JsonOpt = False) -> None:
    """One version: its hash, lineage, every state change with its reason, its evaluations and deployments."""
    from dataclasses import asdict

    from consortium.transcript.verify import read_entries

    lineage = _lineage(run_dir)
    v = lineage.registry.get(version)
    evaluations = [e.body | {"entry": e.index} for e in lineage.evaluations if version in (e.body["version"], e.body["baseline"])]
    deployments = [
        {"entry": e.index, "site": e.author, **{k: e.body[k] for k in ("reason", "stage", "accepted", "detail")}}
        for e in read_entries(run_dir) if e.kind == "deployment" and e.body["version"] == version
    ]
    shown = {
        **v.to_json(), "lineage": [x.id for x in lineage.registry.lineage(version)],
        "running_on": sorted(s for s, ver in lineage.deployed.items() if ver == version),
        "evaluations": evaluations, "deployments": deployments,
    }
    if as_json:
        sys.stdout.write(json.dumps(shown) + "\n")
        return
    out_console.print(f"[bold]{v.id}[/] {v.state}; lineage {' <- '.join(shown['lineage'])}; round {v.round}; sha256 {v.sha256[:16]}...")
    for change in v.history:
        c = asdict(change)
        out_console.print(f"  {c['at']} {c['previous'] or '-'} -> {c['state']} by {c['by']}: {c['reason']}", highlight=False)
    for ev in evaluations:
        verdict = "passed" if ev["passed"] else "FAILED"
        out_console.print(f"  {ev['purpose']} (stage {ev['stage']}) on {', '.join(ev['sites'])} against {ev['baseline'] or '-'}: {verdict}")
    out_console.print(f"  running on: {', '.join(shown['running_on']) or 'no site'}")


@models_app.command("register")
def models_register(
    run_dir: RunArg,
    model: Annotated[Path, typer.Option("--model", help="a .safetensors file with the run's layout and standardisation")],
    parent: Annotated[str, typer.Option("--parent", help="the version it was trained from")],
    by: Annotated[str, typer.Option("--by", help="the member who brings it in")] = "coordinator",
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Register a model trained from a version (fine-tuned, say) as a new candidate."""
    from consortium.lifecycle.manager import read_model_file

    tensors = read_model_file(model)
    with _reopened(run_dir, keys, kit, schema, wait) as lc:
        if lc.agreement.role_of(by) is None:
            raise ConfigError(f"'{by}' is not a member of the agreement: name the member who brings the model in")
        v = lc.register(tensors, parent=parent, by=by)
    out_console.print(f"registered {v.id} (candidate, parent {parent}): sha256 {v.sha256[:16]}...")


StagesOpt = Annotated[int | None, typer.Option("--stages", min=1, help="run only this many rollout stages now (default: all)")]


@models_app.command("promote")
def models_promote(
    run_dir: RunArg, version: VersionArg, stages: StagesOpt = None, as_json: JsonOpt = False,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Canary evaluation, then production in the agreement's stages with monitoring after each.

    Exits 0 when the version ends in production, 1 when the canary rejects it or monitoring rolls it back.
    """
    with _reopened(run_dir, keys, kit, schema, wait) as lc, err_console.status(f"promoting {version}: canary evaluation"):
        promotion = lc.promote(version, stages=stages)
    _print_promotion(promotion, as_json)


@models_app.command("advance")
def models_advance(
    run_dir: RunArg, stages: StagesOpt = None, as_json: JsonOpt = False,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Take the production version's rollout on from the stage it reached, with monitoring after each stage."""
    with _reopened(run_dir, keys, kit, schema, wait) as lc, err_console.status("advancing the rollout"):
        promotion = lc.advance(stages=stages)
    _print_promotion(promotion, as_json)


def _print_promotion(promotion: Any, as_json: bool) -> None:
    from consortium.lifecycle.lineage import describe_failures

    version = promotion.version
    if as_json:
        sys.stdout.write(json.dumps(promotion.to_json()) + "\n")
    elif promotion.outcome == "rejected":
        err_console.print(f"[bold red]rejected at canary[/]: {version} {describe_failures(promotion.failed)}; it is retired", highlight=False)
    else:
        for stage in promotion.stages:
            watch = stage.get("monitoring")
            watch = watch if isinstance(watch, str) else ("passed" if watch["passed"] else "FAILED: " + describe_failures(watch["failed"]))
            refused = [f"{s} {a}" for s, a in stage["answers"].items() if a != "deployed"]
            out_console.print(
                f"stage {stage['stage']} ({stage['share']:.0%}): running on {', '.join(stage['running'])}"
                + (f"; {'; '.join(refused)}" if refused else "") + f"; monitoring {watch}", highlight=False,
            )
        if promotion.rolled_back:
            err_console.print(f"[bold red]rolled back[/]: {version} regressed during the rollout; {promotion.baseline} is back everywhere")
        elif promotion.held_after is not None:
            out_console.print(f"[bold green]{version} is in production[/], rolled out to stage {promotion.held_after}: "
                              "consortium models advance takes it on")
        else:
            out_console.print(f"[bold green]{version} is in production[/] on every stage")
    if promotion.outcome != "production":
        raise Exit(1)


ToOpt = Annotated[str, typer.Option("--to", help="the earlier production version to restore")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="why: it goes in the transcript for every member to read")]
MemberOpt = Annotated[str, typer.Option("--member", help="who demands it: a coordinator, site or auditor (signs it)")]


@models_app.command("rollback")
def models_rollback(
    run_dir: RunArg, to: ToOpt, reason: ReasonOpt, member: MemberOpt = "coordinator",
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Restore an earlier production version everywhere, signed by the member who demands it."""
    from consortium.governance.agreement import load_member_key

    if kit is not None and member != "coordinator":
        raise ConfigError("the deployed coordinator signs only its own demands: a site or auditor halts the run (consortium halt)")
    with _reopened(run_dir, keys, kit, schema, wait) as lc:
        if lc.agreement.role_of(member) is None:
            raise ConfigError(f"'{member}' is not a member of the agreement: name the member who demands the rollback")
        key = load_member_key(lc.agreement, keys, member) if keys is not None else None
        answers = lc.rollback(to, reason=reason, member=member, key=key)
    refused = [f"{s} ({a})" for s, a in answers.items() if a != "deployed"]
    out_console.print(
        f"[bold yellow]rolled back[/] to {to} by {member}: {reason.strip()}; restored on {len(answers) - len(refused)} site(s)"
        + (f", not on {', '.join(refused)}" if refused else ""), highlight=False,
    )


app.command("rollback")(models_rollback)  # consortium rollback: the same command, at the top level


@models_app.command("monitor")
def models_monitor(
    run_dir: RunArg,
    incoming: Annotated[
        list[str] | None, typer.Option("--incoming", help="SITE=FILE.csv: the records that reached a simulated site since training (repeatable)")
    ] = None,
    keys: SimKeysOpt = None, kit: KitOpt = None, schema: SchemaOpt = None, wait: WaitOpt = 120.0,
) -> None:
    """Each site checks its incoming records for drift against its training records; breaches become signed incidents."""
    with _reopened(run_dir, keys, kit, schema, wait, incoming) as lc:
        reports = lc.monitor()
    for e in reports:
        if e.kind == "drift_incident":
            what = ", ".join(e.body["features"]) or "none"
            out_console.print(
                f"[bold red]drift incident[/] filed by {e.author} (entry {e.index}): features {what}; "
                f"label shift {e.body['label_shift']:.3f}; promotion is paused", highlight=False,
            )
        else:
            out_console.print(f"[bold green]resolved[/]: {e.author}'s incoming data no longer drifts (entry {e.index})")
    if not reports:
        out_console.print("no drift to report: every site's check is within the agreement's thresholds (or kept at the site)")


def _print_audit(result: dict[str, Any], names: list[str]) -> None:
    mia = result["attacks"].get("mia") if "mia" in names else None
    if mia is not None:
        for attack in ("loss", "lira"):
            if attack not in mia:
                continue
            t = RichTable(title=f"membership inference: {attack} ({mia['shadows']} shadows)" if attack == "lira" else
                          "membership inference: loss threshold")
            for col in ("site", "members", "AUC", "TPR @ 0.1% FPR", "TPR @ 1% FPR", "epsilon", "within DP bound"):
                t.add_column(col, justify="left" if col == "site" else "right")
            for v in mia[attack]["sites"]:
                rates = [f"{p['tpr']:.2%} [{p['interval'][0]:.2%}, {p['interval'][1]:.2%}]" for p in v["tpr_at_fpr"]]
                eps = "no DP" if v["epsilon"] is None else f"{v['epsilon']:.3g}"
                within = {None: "-", True: "yes", False: "[bold red]NO[/]"}[v["within_dp_bound"]]
                t.add_row(v["site"], str(v["members"]), f"{v['auc']:.3f}", *rates, eps, within)
            out_console.print(t)
    out_console.print(f"written: {Path(result['run_dir']) / 'audit.json'}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: turns every expected failure into one line and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="consortium")
        if isinstance(code, int) and code:  # without standalone mode, click returns an Exit's code
            sys.exit(code)
    except ConsortiumError as exc:
        err_console.print(f"[bold red]error[/]: {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: unknown option, a value of the wrong type or range
        if not exc.format_message():
            sys.exit(2)  # no arguments at all: the help was shown
        ctx = getattr(exc, "ctx", None)
        command = f"{ctx.command_path} --help" if ctx is not None else "consortium --help"
        err_console.print(f"[bold red]error[/]: {exc.format_message()} (see: {command})", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
