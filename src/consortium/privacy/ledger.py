"""A site's own privacy budget, kept where the data lives.

Every round the site agrees to train is recorded here as its frozen
``PrivacyEvent`` before training starts (so a lost reply still counts as
spent), in one SQLite transaction: a crash leaves the ledger as it was before
or after the append, never half-written. The ledger belongs to the site: the
coordinator has no handle on it, and a restarted site reads it back and goes
on refusing what would exceed its cap.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Float, Integer, String, Text, create_engine, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from consortium.db import open_engine
from consortium.errors import ConfigError, ConsortiumError
from consortium.privacy.accountant import PLD_INTERVAL, Accountant, epsilon
from consortium.privacy.events import PrivacyEvent, parse_event
from consortium.runs import require_run_folder


class BudgetExceeded(ConsortiumError):
    """A round would take a site past the epsilon cap its own policy sets."""


class _Base(DeclarativeBase):
    pass


class _Policy(_Base):
    __tablename__ = "policy"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(128))
    epsilon_cap: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    accountant: Mapped[str] = mapped_column(String(8))
    pld_interval: Mapped[float] = mapped_column(Float)  # the accountant's resolution: re-reads give the same epsilon


class _Spent(_Base):
    __tablename__ = "spent"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run: Mapped[str] = mapped_column(String(64), default="")  # the run's id, from the manifest the site endorsed
    round: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(256))
    event: Mapped[str] = mapped_column(Text)  # the PrivacyEvent as canonical JSON
    epsilon_after: Mapped[float] = mapped_column(Float)


@dataclass(frozen=True)
class Paid:
    """One round a site signed that it paid for: the run, the round and the privacy event, from its signed decision."""

    run: str
    round: int
    event: PrivacyEvent


@dataclass(frozen=True)
class Discrepancy:
    """A ledger row that disagrees with what the site signed: ``deleted``, ``edited``, or ``unsigned`` (paid, yet
    no signed decision records it: the reply was lost or the round was cut off, which is no fault)."""

    kind: str
    run: str
    round: int
    detail: str

    def __str__(self) -> str:
        return f"run {self.run[:12]} round {self.round}: {self.detail}"


@dataclass(frozen=True)
class Decision:
    accepted: bool
    epsilon_before: float
    epsilon_after: float
    reason: str = ""


class BudgetLedger:
    """The events a site has paid for, and its cap. Opening an existing ledger keeps its history."""

    def __init__(self, path: Path, *, site: str, epsilon_cap: float, delta: float, accountant: Accountant = "pld"):
        if not (epsilon_cap > 0):
            raise ConfigError(f"a site's epsilon cap must be positive, found {epsilon_cap}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # the site's own: 0600, and SQLite's WAL files after it
        self._engine = open_engine(f"sqlite:///{path}")
        _Base.metadata.create_all(self._engine)
        if "run" not in {c["name"] for c in inspect(self._engine).get_columns("spent")}:  # a ledger from before runs had ids
            with self._engine.begin() as conn:
                conn.execute(text("ALTER TABLE spent ADD COLUMN run VARCHAR(64) NOT NULL DEFAULT ''"))
        with Session(self._engine) as s, s.begin():
            policy = s.get(_Policy, 1)
            if policy is None:
                s.add(
                    _Policy(
                        id=1, site=site, epsilon_cap=epsilon_cap, delta=delta, accountant=accountant, pld_interval=PLD_INTERVAL
                    )
                )
            elif policy.site != site:
                raise ConfigError(f"ledger {path} belongs to site '{policy.site}', not '{site}'")
            else:
                # A site may tighten its own cap, never loosen it silently through a restart.
                policy.epsilon_cap = min(policy.epsilon_cap, epsilon_cap)
        self.site = site

    def reconcile(self, signed: list[Paid], *, restore: bool = False) -> list[Discrepancy]:
        """Compare the ledger with the rounds this site signed that it paid for (its own signed decisions:
        the site's record, or a run's transcript); with ``restore``, put every deleted or edited row back
        as signed, in one transaction, so a lost or edited ledger never lets a cap be spent twice."""
        with Session(self._engine) as s, s.begin():
            found = _discrepancies(s.scalars(select(_Spent).order_by(_Spent.id)).all(), signed)
            if restore and any(d.kind != "unsigned" for d in found):
                by_key = {(p.run, p.round): p for p in signed}
                restored = []
                for d in found:
                    if d.kind == "unsigned":
                        continue
                    paid = by_key[(d.run, d.round)]
                    for row in s.scalars(select(_Spent).where(_Spent.run == d.run, _Spent.round == d.round)).all():
                        s.delete(row)
                    restored.append(_Spent(run=d.run, round=d.round, label=f"round {d.round} (restored from the signed record)",
                                           event=paid.event.model_dump_json(), epsilon_after=0.0))
                s.add_all(restored)
                s.flush()
                total = _epsilon_under(self._policy(s), [parse_event(r.event) for r in s.scalars(select(_Spent)).all()])
                for row in restored:  # appended last: each stands at the whole ledger's epsilon
                    row.epsilon_after = total
        return found

    def _policy(self, s: Session) -> _Policy:
        policy = s.get(_Policy, 1)
        assert policy is not None
        return policy

    @property
    def epsilon_cap(self) -> float:
        with Session(self._engine) as s:
            return self._policy(s).epsilon_cap

    @property
    def delta(self) -> float:
        with Session(self._engine) as s:
            return self._policy(s).delta

    def events(self) -> list[PrivacyEvent]:
        with Session(self._engine) as s:
            return _events(s)

    def history(self) -> list[dict[str, object]]:
        with Session(self._engine) as s:
            rows = s.scalars(select(_Spent).order_by(_Spent.id)).all()
            return [
                {"round": r.round, "label": r.label, "epsilon_after": r.epsilon_after, "event": json.loads(r.event)}
                for r in rows
            ]

    def spent(self) -> float:
        with Session(self._engine) as s:
            return _epsilon_under(self._policy(s), _events(s))

    def check(self, new: PrivacyEvent) -> Decision:
        """Would ``new`` keep the site within its cap? A dry run: nothing is written."""
        with Session(self._engine) as s:
            return self._decide(s, new)

    def spend(self, new: PrivacyEvent, *, rnd: int, label: str = "", run: str = "") -> Decision:
        """Record ``new`` if it fits under the cap, in one transaction; raise BudgetExceeded otherwise.

        The check reads the ledger in the transaction that appends the row, so what was checked is what
        the row is added to."""
        with Session(self._engine) as s, s.begin():
            decision = self._decide(s, new)
            if not decision.accepted:
                raise BudgetExceeded(decision.reason)
            s.add(_Spent(run=run, round=rnd, label=label, event=new.model_dump_json(), epsilon_after=decision.epsilon_after))
        return decision

    def _decide(self, s: Session, new: PrivacyEvent) -> Decision:
        p = self._policy(s)
        so_far = _events(s)
        before = _epsilon_under(p, so_far)
        if so_far and so_far[0].level != new.level:
            return Decision(
                False,
                before,
                before,
                f"privacy budget: this site's ledger holds {so_far[0].level}-level spending and one ledger "
                f"keeps one level: it refuses a {new.level}-level round",
            )
        after = _epsilon_under(p, [*so_far, new])
        if after > p.epsilon_cap:
            return Decision(
                False,
                before,
                after,
                f"privacy budget: this round would bring epsilon from {before:.3f} to {after:.3f}, "
                f"above this site's cap of {p.epsilon_cap:g} (delta {p.delta:g})",
            )
        return Decision(True, before, after)


def _events(s: Session) -> list[PrivacyEvent]:
    return [parse_event(r.event) for r in s.scalars(select(_Spent).order_by(_Spent.id)).all()]


def _discrepancies(rows: list[_Spent], signed: list[Paid]) -> list[Discrepancy]:
    """Each signed payment missing from ``rows`` or recorded otherwise, and each row no signature covers."""
    by_key: dict[tuple[str, int], list[_Spent]] = {}
    for row in rows:
        by_key.setdefault((row.run, row.round), []).append(row)
    runs = {p.run for p in signed}
    out: list[Discrepancy] = []
    for p in signed:
        held = by_key.get((p.run, p.round), [])
        if not held:
            out.append(Discrepancy("deleted", p.run, p.round, "signed as paid, and the ledger has no row for it (deleted)"))
        elif any(parse_event(r.event) != p.event for r in held) or len(held) > 1:
            out.append(Discrepancy("edited", p.run, p.round, "the ledger's row is not the privacy event the site signed (edited)"))
    paid = {(p.run, p.round) for p in signed}
    for (run, rnd), held in by_key.items():
        if run in runs and (run, rnd) not in paid:
            out.append(Discrepancy("unsigned", run, rnd, "paid in the ledger; no signed decision records it (a reply lost or a round cut off)"))
    return sorted(out, key=lambda d: (d.run, d.round))


def _epsilon_under(policy: _Policy, events: list[PrivacyEvent]) -> float:
    return epsilon(events, policy.delta, policy.accountant, pld_interval=policy.pld_interval)  # type: ignore[arg-type]


def read_ledgers(
    run_dir: Path, *, paths: list[Path] | None = None, signed: dict[str, list[Paid]] | None = None
) -> dict[str, dict[str, object]]:
    """Every site ledger under ``run_dir/sites/*/budget.sqlite`` (or at ``paths``), read only; with ``signed``
    (each site's payments as it signed them), each ledger's ``discrepancies`` with them, by run and round."""
    require_run_folder(run_dir)
    paths = paths if paths is not None else sorted(Path(run_dir).glob("sites/*/budget.sqlite"))
    if not paths:
        raise ConfigError(f"no site ledgers under '{run_dir}/sites/': the run had differential privacy off")
    out: dict[str, dict[str, object]] = {}
    for path in paths:
        if not path.exists():
            raise ConfigError(f"no ledger at {path}: pass the site's state folder (the one 'consortium join --state' used)")
        engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
        try:
            with Session(engine) as s:
                policy = s.get(_Policy, 1)
                if policy is None:
                    raise ConfigError(f"{path} holds no policy: it is not a site ledger")
                rows = s.scalars(select(_Spent).order_by(_Spent.id)).all()
                events = [parse_event(r.event) for r in rows]
                out[policy.site] = {
                    "epsilon_spent": _epsilon_under(policy, events),
                    "epsilon_cap": policy.epsilon_cap,
                    "delta": policy.delta,
                    "accountant": policy.accountant,
                    "rounds_paid": [r.round for r in rows],
                }
                if signed is not None:
                    out[policy.site]["discrepancies"] = [
                        {"kind": d.kind, "run": d.run, "round": d.round, "detail": d.detail}
                        for d in _discrepancies(list(rows), signed.get(policy.site, []))
                    ]
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot read ledger {path} ({type(exc).__name__}): is it a Consortium ledger?") from None
        finally:
            engine.dispose()
    return out
