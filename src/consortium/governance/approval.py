"""A site's approval of a task's code: default-deny, by exact bytes and dependencies, signed by the site.

The agreement names the task hashes the consortium accepts (``tasks``); a site's own policy names the
ones it approved (``approved_tasks``), each entry signed with the site's identity key and carrying the
file and dependency hashes it was given, so that a later refusal can name the file that differs. A
policy may approve fewer tasks than the agreement accepts, never one it does not (``policy.parse_policy``
refuses that). A site runs a study's task only when both name the hash it computes, then and there,
from its own copy of the code (``require_approved``); with no approval it runs none.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field

from consortium.crypto import keys
from consortium.crypto.keys import CryptoError
from consortium.errors import ConfigError
from consortium.learning.identity import TaskCode, code_digest, task_code
from consortium.transcript.log import canonical

if TYPE_CHECKING:
    from consortium.governance.agreement import Agreement
    from consortium.learning.task import Task
    from consortium.governance.policy import SitePolicy

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
APPROVAL_DOMAIN = b"consortium/task-approval/v1\x00"


class DependencyPin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, max_length=128)
    record: Sha256  # SHA-256 of the hashed rows of the distribution's RECORD


class TaskApproval(BaseModel):
    """One site's signed approval of one task's exact code (``consortium task approve``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(min_length=1, max_length=64)
    task: str = Field(min_length=1, max_length=1000)  # the reference it was reviewed under
    sha256: Sha256
    files: dict[str, Sha256] = Field(min_length=1)
    dependencies: dict[str, DependencyPin] = {}
    approved_at: str
    signature: str = Field(pattern=r"^[0-9a-f]{128}$")  # Ed25519 by the site's identity key

    def pins(self) -> dict[str, dict[str, str]]:
        """The dependencies as ``TaskCode`` holds them."""
        return {name: pin.model_dump() for name, pin in self.dependencies.items()}

    def signed_bytes(self) -> bytes:
        return APPROVAL_DOMAIN + canonical(self.model_dump(mode="json", exclude={"signature"}))

    def check(self, public_key_hex: str) -> str | None:
        """Why this approval does not hold (its hash disagrees with its files, or its signature with the
        site's key), or None."""
        if code_digest(dict(self.files), self.pins()) != self.sha256:
            return "its sha256 is not the hash of its files and dependencies (edited?)"
        try:
            keys.verify(bytes.fromhex(public_key_hex), bytes.fromhex(self.signature), self.signed_bytes())
        except (CryptoError, ValueError):  # a malformed key or signature, or one by another key
            return f"its signature is not {self.site}'s (edited, or signed with another key?)"
        return None


def approve(code: TaskCode, site: str, key: Ed25519PrivateKey) -> TaskApproval:
    """``site``'s signed approval of ``code`` as it is now."""
    body = TaskApproval.model_construct(
        site=site, task=code.ref, sha256=code.sha256, files=dict(code.files),
        dependencies={k: DependencyPin(**v) for k, v in code.dependencies.items()},
        approved_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), signature="0" * 128,
    )
    signature = keys.sign(key, body.signed_bytes()).hex()
    return TaskApproval.model_validate({**body.model_dump(mode="json"), "signature": signature})


def require_approved(code: TaskCode, site: str, accepted: list[str], approvals: list[TaskApproval]) -> TaskApproval:
    """The approval under which ``site`` runs ``code``: its hash must be one the agreement accepts
    (``accepted``) and one the site itself approved.

    Raises:
        ConfigError: one line naming why: no approval at all, the code changed since it was approved
            (naming the file or dependency that differs), or the agreement does not accept it.
    """
    match = next((a for a in approvals if a.sha256 == code.sha256), None)
    if match is None:
        fix = f"review it, then: consortium task approve {code.ref} --site {site} --key KEY --policy POLICY"
        earlier = [a for a in approvals if a.task == code.ref]
        if earlier:
            was = earlier[-1]
            changes = code.differences(dict(was.files), was.pins())
            raise ConfigError(
                f"task {code.ref} is not the code {site} approved on {was.approved_at}: {'; '.join(changes[:3])}; "
                f"{fix}"
            )
        raise ConfigError(f"{site} has not approved task {code.ref} (sha256 {code.sha256[:16]}…) and runs no task it has not: {fix}")
    if code.sha256 not in accepted:
        raise ConfigError(
            f"the agreement does not accept task {code.ref} (sha256 {code.sha256[:16]}…): the consortium adds it to "
            "the agreement's tasks, and every approver signs it again"
        )
    return match


def require_reference_approved(ref: str, site: str, agreement: Agreement, policy: SitePolicy | None) -> TaskCode:
    """The code ``ref`` names, hashed here before any of it runs, once ``require_approved`` holds for it."""
    code = task_code(ref)
    require_approved(code, site, [t.sha256 for t in agreement.tasks], list(policy.approved_tasks) if policy else [])
    return code


def require_task_approval(
    identity: dict[str, str], task: Task, site: str, agreement: Agreement, policy: SitePolicy | None,
) -> None:
    """Refuse to run ``task`` at ``site`` under ``agreement`` unless its code (``identity``, as loaded) is
    one the agreement accepts and the site's ``policy`` approved. The framework's built-in tasks are the
    framework's own code (the manifest pins it by ``code_sha256``) and need no approval.

    Raises:
        ConfigError: as ``require_approved``; or the task is a class with no file, which no site can approve.
    """
    from consortium.learning.task import task_reference  # torch: only where a task is already loaded

    if identity.get("code") == "framework":
        return
    ref = task_reference(task)
    if ref is None:
        raise ConfigError(
            f"task {identity['name']} is defined where it has no file, so {site} cannot approve its code: "
            "save it in a .py file and approve that (consortium task approve)"
        )
    approved = {a.sha256 for a in policy.approved_tasks} if policy else set()
    if identity["sha256"] in approved and identity["sha256"] in {t.sha256 for t in agreement.tasks}:
        return
    require_reference_approved(ref, site, agreement, policy)  # refuses, naming what differs from the approval
    raise ConfigError(f"task {ref} changed on disk while it was loaded: load it again once it is settled")
