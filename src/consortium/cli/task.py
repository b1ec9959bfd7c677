"""``consortium task``: a study's task code, pinned by hash and approved by each site (default-deny).

- ``task hash REF``: the hash of the task's package (every file's exact bytes) and of the distributions it
  imports here, and the entry the agreement's ``tasks`` lists to accept it;
- ``task approve REF --site S --key KEY``: the site's signed approval of that exact code, kept in its policy;
- ``task list --policy POLICY --agreement AGREEMENT``: what the agreement accepts, what the site approved,
  and whether the code on disk is still the code approved.

None of these runs the task's code: it is read and hashed, never imported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from consortium.cli.common import JsonOpt, out_console
from consortium.errors import ConfigError

task_app = typer.Typer(
    no_args_is_help=True,
    help="A study's task code: its hash, a site's signed approval, the approvals a site holds.",
)
RefArg = Annotated[str, typer.Argument(metavar="REF", help="the task as a config names it: path/to/tasks.py:Class or package.module:Class")]


def _beside(key: Path, name: str, given: Path | None) -> Path:
    return given if given is not None else key.parent / name


@task_app.command("hash")
def task_hash(ref: RefArg, as_json: JsonOpt = False) -> None:
    """Hash a task's code as this machine holds it: its package's files and the distributions it imports."""
    from consortium.learning.identity import task_code

    code = task_code(ref)
    if as_json:
        body = {"ref": ref, "sha256": code.sha256, "root": str(code.root), "files": code.files,
                "dependencies": code.dependencies}
        sys.stdout.write(json.dumps(body) + "\n")
        return
    out_console.print(f"task {ref}\nsha256 {code.sha256}\n{len(code.files)} file(s) under {code.root}:", highlight=False)
    for path, digest in code.files.items():
        out_console.print(f"  {digest[:16]}  {path}", highlight=False)
    for name, pin in code.dependencies.items():
        out_console.print(f"  imports {name} {pin['version']} (RECORD {pin['record'][:16]})", highlight=False)
    out_console.print(f"the agreement accepts it with, under tasks:\n  - {{name: {ref}, sha256: {code.sha256}}}",
                      highlight=False, soft_wrap=True)


@task_app.command("approve")
def task_approve(
    ref: RefArg,
    site: Annotated[str, typer.Option(help="the approving site, as the agreement names it")],
    key: Annotated[Path, typer.Option(help="the site's identity key (a kit's identity.key)")],
    policy: Annotated[Path | None, typer.Option(help="the site's policy (default: policy.yaml beside the key)")] = None,
    agreement: Annotated[Path | None, typer.Option(help="the agreement (default: agreement.yaml beside the key)")] = None,
) -> None:
    """Approve this exact code for the site: a signed approval in its policy. Review the code first: the
    site will run it on its data, and nothing else under that name."""
    from consortium.governance.agreement import load_agreement, load_member_key
    from consortium.governance.approval import approve
    from consortium.governance.policy import add_approval
    from consortium.learning.identity import task_code

    policy_path, agreement_path = _beside(key, "policy.yaml", policy), _beside(key, "agreement.yaml", agreement)
    ag = load_agreement(agreement_path)
    if site not in ag.sites():
        raise ConfigError(f"'{site}' is not a site of the {ag.consortium} agreement (its sites: {', '.join(ag.sites())})")
    identity = load_member_key(ag, None, site, file=key)
    code = task_code(ref)
    if code.sha256 not in {t.sha256 for t in ag.tasks}:
        raise ConfigError(
            f"the agreement does not accept task {ref} (sha256 {code.sha256[:16]}...): the consortium adds "
            f"{{name: {ref}, sha256: {code.sha256}}} to its tasks and signs it again; then approve it"
        )
    add_approval(policy_path, approve(code, site, identity), ag)
    out_console.print(
        f"{site} approved task {ref} (sha256 {code.sha256[:16]}..., {len(code.files)} file(s), "
        f"{len(code.dependencies)} distribution(s)) in {policy_path}", highlight=False, soft_wrap=True,
    )


@task_app.command("list")
def task_list(
    policy: Annotated[Path, typer.Option(help="the site's policy")],
    agreement: Annotated[Path, typer.Option(help="the agreement the policy keeps")],
    as_json: JsonOpt = False,
) -> None:
    """The tasks the agreement accepts and the ones this site approved (each approval's signature checked),
    with whether the code on disk is still the code approved."""
    from consortium.governance.agreement import load_agreement
    from consortium.governance.policy import load_policy
    from consortium.learning.identity import task_code

    ag = load_agreement(agreement)
    pol = load_policy(policy, ag)
    approved = {a.sha256: a for a in pol.approved_tasks}
    rows = []
    for accepted in ag.tasks:
        approval = approved.get(accepted.sha256)
        row = {"name": accepted.name, "sha256": accepted.sha256, "approved_at": approval.approved_at if approval else None}
        if approval is not None:
            try:
                now = task_code(approval.task)
                changes = now.differences(dict(approval.files), approval.pins())
                row["on_disk"] = "unchanged" if not changes else "; ".join(changes)
            except ConfigError as exc:
                row["on_disk"] = str(exc)
        rows.append(row)
    if as_json:
        sys.stdout.write(json.dumps({"site": pol.site, "tasks": rows}) + "\n")
        return
    if not rows:
        out_console.print(f"the agreement accepts no study task: {pol.site} runs the built-in tasks only", highlight=False)
    for row in rows:
        state = f"approved by {pol.site} {row['approved_at']}, code on disk {row['on_disk']}" if row["approved_at"] else (
            f"NOT approved by {pol.site}: it will not run")
        out_console.print(f"{row['name']}  {row['sha256'][:16]}...  {state}", highlight=False, soft_wrap=True)
