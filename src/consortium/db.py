"""Durable SQL state through SQLAlchemy: the sites' privacy ledgers and the coordinator's run state.

SQLite files are opened in WAL mode with ``synchronous=FULL``: a committed
transaction survives a crash or a power cut, and a reader never sees half of
one. Any other SQLAlchemy URL (PostgreSQL, say) is used as given; its server
provides the same guarantees.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine, event


def _durable(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # a committed transaction survives a power cut
    cur.close()


def open_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _durable)
    return engine
