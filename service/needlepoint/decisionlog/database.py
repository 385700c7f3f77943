"""Where the decision log lives, how to connect to it, and its migrations.

``--database`` takes a SQLAlchemy-style URL: ``sqlite:///path/decisions.sqlite3`` (the default, a
file in the state directory) or ``postgresql://user:password@host:port/db`` (psycopg 3 is used;
``postgres://`` is accepted too). A bare file path means a SQLite file.

SQLite runs in WAL mode with ``synchronous=FULL``: a transaction is durable once COMMIT returns,
against a killed process and against a lost machine, and readers (``decisions export``) never
block the writers. Several worker processes may write the same file; each write waits up to
``busy_timeout`` for the others.

The schema is created and upgraded by Alembic migrations shipped in this package
(``migrations/``); :func:`migrate` runs them and is called by ``needlepoint decisions migrate``
and, once, by ``needlepoint serve`` before any worker starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import Connection, make_url

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
HEAD = "0001"  # the newest migration; the writer refuses a database that is not at it
SQLITE_BUSY_TIMEOUT_MS = 30_000


def state_dir() -> Path:
    """The directory for the default database: ``$NEEDLEPOINT_STATE_DIR``, else
    ``$XDG_STATE_HOME/needlepoint``, else ``~/.local/state/needlepoint``."""
    explicit = os.environ.get("NEEDLEPOINT_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "needlepoint"


def default_url() -> str:
    """The default database: ``decisions.sqlite3`` in :func:`state_dir`."""
    return f"sqlite:///{state_dir() / 'decisions.sqlite3'}"


def normalize_url(url: str | None) -> str:
    """A URL SQLAlchemy can open: the default when None or empty, a bare path as SQLite, and
    ``postgres(ql)://`` with the psycopg 3 driver named."""
    if not url:
        return default_url()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redacted(url: str) -> str:
    """The URL with any password hidden, for logs and messages."""
    return make_url(normalize_url(url)).render_as_string(hide_password=True)


def connect(url: str | None, *, pool_size: int = 2) -> Engine:
    """An Engine for the decision log. SQLite files get their directory created and every
    connection WAL, ``synchronous=FULL``, foreign keys and a busy timeout."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}, json_serializer=_json_text,
            hide_parameters=True,  # an error's text never carries the stored request or decision
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url, pool_size=pool_size, max_overflow=2, pool_pre_ping=True, json_serializer=_json_text, hide_parameters=True
    )


def _json_text(value: object) -> str:
    """JSON columns written with orjson: several times faster than json.dumps on decisions."""
    return orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Durable, concurrent SQLite: WAL journal, fsync on every commit, foreign keys enforced."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(url: str | None) -> str:
    """Bring the database at ``url`` to the newest schema (creating it if need be); the revision
    it is at afterwards. Safe to run again."""
    from alembic import command

    engine = connect(url)
    try:
        with engine.begin() as connection:
            command.upgrade(_alembic_config(connection), "head")
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision the database is at, or None for a database never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return MigrationContext.configure(connection).get_current_revision()
