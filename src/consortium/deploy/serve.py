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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from consortium.config import AgreementConfig, SimulationConfig, load_config
from consortium.crypto import keys
from consortium.data import DataSchema, Table, layout_table, load_schema
from consortium.deploy.dashboard import Board, Snapshot, create_dashboard_app, head_status
from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import Kit
from consortium.deploy.service import HttpsServer, create_app
from consortium.errors import ConfigError
from consortium.governance.agreement import Agreement, load_agreement, load_member_key
from consortium.learning.task import load_task
from consortium.deploy.state import CoordinatorState
from consortium.run.orchestrator import CoordinatorRun, RunResult, signed_agreement
from consortium.run.plan import plan_run
from consortium.run.session import finite_metrics
from consortium.protocol.coordinator import COORDINATOR, RoundRecord
from consortium.runs import new_run_dir
from consortium.transcript.log import TranscriptWriter
from consortium.audit.verify import signed_epsilon
from consortium.deploy.mailbox_transport import MailboxTransport

if TYPE_CHECKING:
    from consortium.run.lifecycle import Lifecycle


STATE_FILE = "coordinator.sqlite"


def directory_of(agreement: Agreement) -> dict[str, bytes]:
    """The protocol's members (the sites, then the coordinator) and the public keys the agreement names."""
    named = {m.name: m for m in agreement.members}
    out = {}
    for name in [*agreement.sites(), COORDINATOR]:
        public = named[name].public_key if name in named else None
        if public is None:
            raise ConfigError(f"the agreement names no public key for '{name}': provision the kits with consortium init")
        out[name] = bytes.fromhex(public)
    return out


def served_layout(config: SimulationConfig, schema: DataSchema | None, sample: Path | None) -> Table:
    """The data's layout (no rows) the coordinator plans from: the agreed schema's, or that of a sample the
    config's task reads (a task that loads its sites' data itself: images, arrays).

    Raises:
        ConfigError: neither or both are given, or the task does not read data itself.
    """
    if (schema is None) == (sample is None):
        raise ConfigError("give the data's layout: --schema (the agreed CSV schema) or --sample PATH (what the task's load reads)")
    if schema is not None:
        return layout_table(schema)
    task = load_task(config.task or "classification", config.model)
    if not task.loads_data:
        raise ConfigError(f"--sample is read by the task's load, and {task.name} defines none: give --schema")
    assert sample is not None
    table = task.records(sample)
    return table.take(np.zeros(0, dtype=np.int64))  # the layout only: the coordinator keeps no record


class ServedRun(CoordinatorRun):
    """A run whose sites are separate processes, polling this coordinator's HTTPS service."""

    def __init__(
        self,
        kit: Kit,
        config: SimulationConfig | None,
        schema: DataSchema | None,
        *,
        sample: Path | None = None,
        out: Path | None = None,
        recover: bool = False,
        state_url: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        stage_timeout_s: float = 120.0,
        pickup_timeout_s: float = 15.0,
        poll_wait_s: float = 20.0,
        dashboard_port: int | None = None,
    ) -> None:
        """A new run in ``out`` (default: a fresh folder under runs/), or with ``recover`` the run in
        ``out`` that a stopped coordinator left, under the config it recorded. The data's layout comes
        from the agreed ``schema`` (CSV sites), or, for a task that reads its sites' data itself, from
        ``sample``: data in the sites' layout (public or generated examples) that the task's ``load``
        reads, of which only the layout is kept."""
        if kit.role != "coordinator":
            raise ConfigError(f"{kit.folder} is the kit of {kit.role} '{kit.member}': serve with the coordinator's kit")
        self.kit = kit
        if recover:
            if out is None or not (out / STATE_FILE).exists():
                raise ConfigError(f"{out} holds no coordinator state ({STATE_FILE}): --recover takes the folder of a served run")
            kinds = [e.kind for e in TranscriptWriter(out).entries]
            if "final_model" in kinds and (out / "summary.json").exists():
                raise ConfigError(f"the run in {out} finished: there is nothing to recover")
            if kinds and kinds[-1] == "halt":  # a crash is no way around a halt
                raise ConfigError(f"the run in {out} is halted: only a quorum of approvers continues it (consortium resume)")
            config = load_config(out / "config.yaml")
        elif out is not None and out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty: continue the run it holds with --recover {out}, or choose a new --out")
        if config is None:
            raise ConfigError("a new run needs its config: pass --config (or --recover RUN_DIR to continue one)")
        if not recover and "dataset" not in config.data.model_fields_set:  # named for the sites' own data
            data = config.data.model_copy(update={"dataset": "csv" if schema is not None else "task"})
            config = config.model_copy(update={"data": data})
        agreement_file = kit.folder / "agreement.yaml"
        # The run is held to the kit's agreement, whatever the config's agreement section says.
        config = config.model_copy(update={"agreement": AgreementConfig(file=agreement_file, keys=kit.folder)})
        agreement = signed_agreement(config)
        assert agreement is not None
        plan = plan_run(config, sample=served_layout(config, schema, sample), names=agreement.sites(), agreement=agreement)
        identity = load_member_key(agreement, None, COORDINATOR, file=kit.folder / "identity.key")
        directory = directory_of(agreement)
        assert directory[COORDINATOR] == keys.ed25519_public_bytes(identity.public_key())
        if out is None:  # every input is checked: only now does the run get its folder
            out = new_run_dir(Path("runs"), f"{kit.member}-served-seed{config.seed}")
        out.mkdir(parents=True, exist_ok=True)
        self.mailbox = Mailbox()
        roles = {m.name: m.role for m in agreement.members}
        app = create_app(self.mailbox, roles, poll_wait_s=poll_wait_s)
        self.server = HttpsServer(app, kit, host=host, port=port)
        transport = MailboxTransport(
            self.mailbox, identity=identity, directory=directory, stage_timeout_s=stage_timeout_s,
            pickup_timeout_s=pickup_timeout_s,
        )
        super().__init__(
            plan, transport=transport, identity=identity, directory=directory, run_dir=out,
            state=CoordinatorState(state_url or f"sqlite:///{out / STATE_FILE}"),  # recovers a crash
            resume=recover,
        )
        assert self.agreement is not None
        self.port: int | None = None
        self.board: Board | None = None
        self.dashboard: HttpsServer | None = None
        self.dashboard_port: int | None = None
        if dashboard_port is not None:  # read-only, on its own port: a browser needs no client certificate there
            self.board = Board(Snapshot(self.agreement.consortium, str(self.run_dir), self.config.rounds))
            self.dashboard = HttpsServer(
                create_dashboard_app(self.board, self.agreement), kit, host=host, port=dashboard_port, client_certificates=False
            )

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> RunResult:
        def each_round(record: RoundRecord) -> None:
            self._show("running")
            if on_round is not None:
                on_round(record)

        self._show("running")
        result = super().run(on_round=each_round)
        verified = "verified" if result.summary["transcript"]["verified"] else "NOT verified"
        self._show(f"{result.summary['status']}, transcript {verified}")
        return result

    def _show(self, status: str) -> None:
        """Publish what the dashboard shows now: only ever between rounds, from the run's own thread."""
        if self.board is None:
            return
        assert self.agreement is not None
        epsilon: dict[str, float] = {}
        head = None
        if self.recorder is not None and self.recorder.writer.entries:
            entries = self.recorder.writer.entries
            epsilon = signed_epsilon(entries, entries[0].body)
            head = head_status(self.recorder.writer, self._directory)
        self.board.publish(Snapshot(
            consortium=self.agreement.consortium, run_dir=str(self.run_dir), total_rounds=self.config.rounds, status=status,
            rounds=[finite_metrics(r.to_json()) for r in self.coordinator.history], epsilon=epsilon,
            epsilon_cap=self.agreement.privacy.max_epsilon, head=head,
        ))

    def start(self, *, wait_for_sites_s: float) -> None:
        """Listen, then wait until every site has connected; the error names those that did not."""
        started = time.monotonic()
        self.port = self.server.start()
        if self.dashboard is not None:
            self.dashboard_port = self.dashboard.start()
        missing = self.mailbox.wait_seen(self.names, since=started, timeout_s=wait_for_sites_s)
        if missing:
            self._stop_servers()
            raise ConfigError(
                f"{', '.join(missing)} did not connect within {wait_for_sites_s:g} s: start each site's agent "
                "(consortium join KIT --data CSV --schema SCHEMA), or give them longer (--wait-for-sites)"
            )

    def stop(self, *, grace_s: float = 30.0) -> None:
        """Tell every site the run is over (each gets 410 at its next poll), then stop listening."""
        closed = time.monotonic()
        self.mailbox.close()
        self.mailbox.wait_seen(self.names, since=closed, timeout_s=grace_s)
        self._stop_servers()

    def _stop_servers(self) -> None:
        self.server.stop()
        if self.dashboard is not None:
            self.dashboard.stop()


@contextmanager
def serve_lifecycle(
    kit: Kit, run_dir: Path, schema: Path | None, *, sample: Path | None = None, host: str = "127.0.0.1", port: int | None = None,
    wait_for_sites_s: float = 120.0, stage_timeout_s: float = 120.0, pickup_timeout_s: float = 15.0, poll_wait_s: float = 20.0,
) -> Iterator[Lifecycle]:
    """The deployed coordinator reopens its finished run for the model lifecycle (``consortium models ...
    --kit``): it listens, waits for every site's agent (``consortium join``), and canary, rollout, monitoring
    and rollback go over the same sealed mailbox as the rounds did. When the operation is over every site is
    told so (410), as at the end of a run. The data's layout comes from ``schema`` (the agreed CSV schema) or,
    for a task that loads its own data, from ``sample`` (read by the run's task, as ``serve --sample``)."""
    from consortium.run.lifecycle import Lifecycle

    if kit.role != "coordinator":
        raise ConfigError(f"{kit.folder} is the kit of {kit.role} '{kit.member}': the coordinator's kit drives the lifecycle")
    agreement = load_agreement(kit.folder / "agreement.yaml")
    identity = load_member_key(agreement, None, COORDINATOR, file=kit.folder / "identity.key")
    directory = directory_of(agreement)
    layout = served_layout(load_config(run_dir / "config.yaml"), load_schema(schema) if schema is not None else None, sample)
    mailbox = Mailbox()
    server = HttpsServer(create_app(mailbox, {m.name: m.role for m in agreement.members}, poll_wait_s=poll_wait_s), kit,
                         host=host, port=port)
    transport = MailboxTransport(mailbox, identity=identity, directory=directory, stage_timeout_s=stage_timeout_s,
                                 pickup_timeout_s=pickup_timeout_s)
    started = time.monotonic()
    server.start()
    joined: list[str] = []  # the agents that connected: only they wait to be told the operation is over
    try:
        missing = mailbox.wait_seen(agreement.sites(), since=started, timeout_s=wait_for_sites_s)
        joined = [s for s in agreement.sites() if s not in missing]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} did not connect within {wait_for_sites_s:g} s: start each site's agent "
                "(consortium join KIT --data CSV --schema SCHEMA), or give them longer (--wait-for-sites)"
            )
        yield Lifecycle(run_dir, coordinator_key=identity, directory=directory, transport=transport, sample=layout)
    finally:
        closed = time.monotonic()
        mailbox.close()
        if joined:
            mailbox.wait_seen(joined, since=closed, timeout_s=30.0)
        server.stop()
