"""``consortium serve KIT``: the coordinator as a service; sites reach it from behind their firewalls.

The run is the simulation's own coordinator side (``CoordinatorRun``):
privacy planning, the agreement check, the rounds, the transcript, halts, the
final model and the summary. Only the transport differs: each stage's sealed
requests wait in a mailbox that the sites poll over mutual TLS
(``consortium.deploy.service``). The coordinator holds no site's data: what
it knows of the data is the agreed schema (feature names and classes).
Before the first stage it waits for every site of the agreement to connect;
when the run is over it tells each site so (410) before it stops listening.
"""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.config import AgreementConfig, SimulationConfig
from consortium.crypto import keys
from consortium.data import DataSchema, layout_table
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import Kit
from consortium.deploy.service import HttpsServer, create_app
from consortium.errors import ConfigError
from consortium.governance.agreement import Agreement, load_agreement, load_member_key
from consortium.orchestrator import CoordinatorRun
from consortium.protocol.coordinator import COORDINATOR
from consortium.runs import new_run_dir
from consortium.transport.mailbox import MailboxTransport


def _sites(agreement: Agreement) -> list[str]:
    return [m.name for m in agreement.members if m.role == "site"]


def directory_of(agreement: Agreement) -> dict[str, bytes]:
    """The protocol's members (the sites, then the coordinator) and the public keys the agreement names."""
    named = {m.name: m for m in agreement.members}
    out = {}
    for name in [*_sites(agreement), COORDINATOR]:
        public = named[name].public_key if name in named else None
        if public is None:
            raise ConfigError(f"the agreement names no public key for '{name}': provision the kits with consortium init")
        out[name] = bytes.fromhex(public)
    return out


class ServedRun(CoordinatorRun):
    """A run whose sites are separate processes, polling this coordinator's HTTPS service."""

    def __init__(
        self,
        kit: Kit,
        config: SimulationConfig,
        schema: DataSchema,
        *,
        out: Path | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        stage_timeout_s: float = 120.0,
        poll_wait_s: float = 20.0,
    ) -> None:
        if kit.role != "coordinator":
            raise ConfigError(f"{kit.folder} is the kit of {kit.role} '{kit.member}': serve with the coordinator's kit")
        self.kit = kit
        agreement_file = kit.folder / "agreement.yaml"
        # The run is held to the kit's agreement, whatever the config's agreement section says.
        config = config.model_copy(update={"agreement": AgreementConfig(file=agreement_file, keys=kit.folder)})
        names = _sites(load_agreement(agreement_file))
        if out is None:
            out = new_run_dir(Path("runs"), f"{kit.member}-served-seed{config.seed}")
        super().__init__(config, names=names, sample=layout_table(schema), out=out)
        assert self.agreement is not None
        self.mailbox = Mailbox()
        roles = {m.name: m.role for m in self.agreement.members}
        app = create_app(self.mailbox, roles, poll_wait_s=poll_wait_s)
        self.server = HttpsServer(app, kit, host=host, port=port)
        self.transport = MailboxTransport(
            self.mailbox, identity=self._identity, directory=self._directory, stage_timeout_s=stage_timeout_s
        )
        self.port: int | None = None

    def _member_keys(self) -> tuple[Ed25519PrivateKey, dict[str, bytes]]:
        assert self.agreement is not None
        identity = load_member_key(self.agreement, None, COORDINATOR, file=self.kit.folder / "identity.key")
        directory = directory_of(self.agreement)
        assert directory[COORDINATOR] == keys.ed25519_public_bytes(identity.public_key())
        return identity, directory

    def start(self, *, wait_for_sites_s: float) -> None:
        """Listen, then wait until every site has connected; the error names those that did not."""
        started = time.monotonic()
        self.port = self.server.start()
        missing = self.mailbox.wait_seen(self.names, since=started, timeout_s=wait_for_sites_s)
        if missing:
            self.server.stop()
            raise ConfigError(
                f"{', '.join(missing)} did not connect within {wait_for_sites_s:g} s: start each site's agent "
                "(consortium join KIT --data CSV --schema SCHEMA), or give them longer (--wait-for-sites)"
            )

    def stop(self, *, grace_s: float = 30.0) -> None:
        """Tell every site the run is over (each gets 410 at its next poll), then stop listening."""
        closed = time.monotonic()
        self.mailbox.close()
        self.mailbox.wait_seen(self.names, since=closed, timeout_s=grace_s)
        self.server.stop()
