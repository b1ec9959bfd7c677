"""Governance: ``consortium agreement`` (write, check, sign, explain), ``consortium key`` (identity keys)
and ``consortium policy`` (a site's own policy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from consortium.cli.common import JsonOpt, out_console
from consortium.errors import ConfigError


agreement_app = typer.Typer(help="The consortium agreement: write one, check it, explain it in plain language.")


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


@agreement_app.command("collect")
def agreement_collect(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="the folder consortium init wrote (its agreement and kits/)")],
    extra: Annotated[list[Path] | None, typer.Option("--from", help="a signatures file a member sent (repeatable)")] = None,
) -> None:
    """Put every approver's signature in every kit: gathered from DIR, each kit and --from files, each checked."""
    from consortium.governance.agreement import collect_signatures

    agreement = folder / "agreement.yaml"
    if not agreement.is_file():
        raise ConfigError(f"{folder} holds no agreement.yaml: give the folder consortium init wrote")
    kits = sorted(folder.glob("kits/*/agreement.yaml"))
    signed, missing = collect_signatures(agreement, kits, list(extra or []))
    out_console.print(
        f"{len(signed)} signatures in {agreement} and {len(kits)} kits; "
        + (f"[bold red]still to sign: {', '.join(missing)}[/] (no run may start)" if missing else "every approver has signed")
    )


key_app = typer.Typer(help="Identity keys: one Ed25519 key per member, in a file only its owner can read.")


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
