"""The coordinator's durable state: what a restarted ``consortium serve --recover`` continues from.

One SQL database per run (SQLite in WAL mode by default, in the run folder;
any SQLAlchemy URL, PostgreSQL included, through ``--state-url``), written
in one transaction as each round ends, before its tree head is published:

- ``rounds``: each finished round's record (who was asked, who answered,
  dropped or refused, the metrics);
- ``members``: each site's standing: the last round it was asked, answered
  in, and how it ended;
- ``checkpoints``: everything the coordinator carries between rounds (its
  state as JSON, the model and strategy arrays as safetensors bytes), and
  the write-ahead record: the round's transcript entries, signed, which are
  appended to the transcript only once this transaction has committed.

The transcript stays in its append-only files in the run folder, which any
member verifies from the folder alone. State and transcript change as one
step: a restart appends whatever entries of the last committed record the
transcript lacks, then reads there whether the round after the checkpoint
had begun (its plan went out); see ``consortium.run.recovery``. Nothing is
pickled: JSON text, and tensors through safetensors.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save
from sqlalchemy import Integer, LargeBinary, String, Text, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from consortium.db import open_engine
from consortium.errors import ConfigError


class _Base(DeclarativeBase):
    pass


class _Round(_Base):
    __tablename__ = "rounds"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    record: Mapped[str] = mapped_column(Text)  # the RoundRecord as JSON


class _Member(_Base):
    __tablename__ = "members"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_asked: Mapped[int] = mapped_column(Integer)
    last_answered: Mapped[int] = mapped_column(Integer)  # 0: never
    last_outcome: Mapped[str] = mapped_column(String(16))  # answered, dropped, refused


class _Checkpoint(_Base):
    __tablename__ = "checkpoints"
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(Text)
    arrays: Mapped[bytes] = mapped_column(LargeBinary)
    saved_at: Mapped[float]


class CoordinatorState:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self._engine = open_engine(url)
            _Base.metadata.create_all(self._engine)
        except SQLAlchemyError as exc:
            raise ConfigError(f"cannot open the coordinator's state at {url} ({type(exc).__name__}): check the URL") from None

    def save_round(self, record: dict[str, Any] | None, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Round ``state["round"]`` is over (0: setup, which has no ``record``): its record, the members'
        standing and the checkpoint, with the write-ahead record it holds, all or nothing."""
        rnd = int(state["round"])
        blob = safetensors_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        with Session(self._engine) as s, s.begin():
            s.merge(_Checkpoint(round=rnd, state=json.dumps(state, allow_nan=False), arrays=blob, saved_at=time.time()))
            if record is None:
                return
            outcome = {s: "answered" for s in record["answered"]} | {s: "dropped" for s in record["dropped"]}
            outcome |= {s: "refused" for s in record["refused"]}
            s.merge(_Round(round=rnd, status=str(record["status"]), record=json.dumps(record, allow_nan=False)))
            for name in record["selected"]:
                member = s.get(_Member, name) or _Member(name=name, last_answered=0)
                member.last_asked = rnd
                member.last_outcome = outcome.get(name, "dropped")
                if member.last_outcome == "answered":
                    member.last_answered = rnd
                s.merge(member)

    def latest(self) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """The last checkpoint: (state, arrays); None before any round ended."""
        with Session(self._engine) as s:
            row = s.scalars(select(_Checkpoint).order_by(_Checkpoint.round.desc()).limit(1)).first()
            if row is None:
                return None
            try:
                return json.loads(row.state), safetensors_load(row.arrays)
            except (ValueError, SafetensorError):
                raise ConfigError(f"the checkpoint of round {row.round} in {self.url} is damaged: the run cannot continue") from None
