"""The decision log's tables, as SQLAlchemy Core metadata (the Alembic migrations create them).

One row per decision in ``decisions``; one row per rule that fired in ``fired_rules`` (so the
overrides report counts with SQL, not by reading every decision's JSON); one row per card shown
to an EHR in ``cards``; one row per distinct feedback item in ``feedback``. JSON columns use the
generic ``JSON`` type: TEXT on SQLite, ``json`` on PostgreSQL. Times are stored as ISO 8601 UTC
text with a ``Z`` (the form the contract uses), which sorts correctly and reads the same on both
databases; ``created_at`` is also what ``decisions export --since`` filters on.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only gives an auto-increment rowid to INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
_ID = BigInteger().with_variant(Integer(), "sqlite")

decisions = Table(
    "decisions",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("decision_id", String(80), nullable=False),  # the decision's content-addressed id (not unique: a replay repeats it)
    Column("ruleset_id", String(200), nullable=False),
    Column("ruleset_version", String(80), nullable=False),
    Column("ruleset_digest", String(100), nullable=False),
    Column("as_of", String(40), nullable=False),  # the instant the decision was made at
    Column("created_at", String(40), nullable=False),  # when the service answered
    Column("road", String(20), nullable=False),  # grpc | cds-hooks | cli
    Column("caller", Text, nullable=False),  # who asked: peer address, client identity, CDS Hooks userId
    Column("correlation_id", Text, nullable=False, default=""),
    Column("request_hash", String(80), nullable=False),  # sha256 of the request as received, before masking
    Column("summary", JSON, nullable=False),  # the outcome in brief (see entries.summarize)
    Column("decision", LargeBinary, nullable=False),  # the serialized needlepoint.v1.Decision
    Column("replay_kind", String(20), nullable=False),  # evaluate-request | cds-hooks-request
    Column("replay_input", Text, nullable=False),  # JSON text: the request, masked, in a form `rules diff --cases` reads
    Column("masked", JSON, nullable=False),  # what masking removed or replaced (paths), so a reader knows
)
Index("ix_decisions_created_at", decisions.c.created_at)
Index("ix_decisions_decision_id", decisions.c.decision_id)

fired_rules = Table(
    "fired_rules",
    metadata,
    Column("decision_row", _ID, ForeignKey("decisions.id", ondelete="CASCADE"), primary_key=True),
    Column("rule_id", String(200), primary_key=True),
)
Index("ix_fired_rules_rule_id", fired_rules.c.rule_id)

cards = Table(
    "cards",
    metadata,
    Column("card_uuid", String(200), primary_key=True),
    Column("decision_row", _ID, ForeignKey("decisions.id", ondelete="CASCADE"), nullable=False),
    Column("service_id", String(200), nullable=False),
    Column("rule_ids", JSON, nullable=False),  # the rules behind the card
    Column("summary", Text, nullable=False, default=""),
    Column("indicator", String(20), nullable=False, default=""),
    Column("override_reasons", JSON, nullable=False),  # the Codings the card offered
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(80), nullable=False),  # sha256 of the service id and the item as sent
    Column("service_id", String(200), nullable=False),
    Column("card_uuid", String(200), nullable=False),  # not a foreign key: feedback may name a card we never logged
    Column("outcome", String(20), nullable=False),  # accepted | overridden
    Column("accepted_suggestions", JSON, nullable=False),
    Column("reason_system", Text, nullable=False, default=""),
    Column("reason_code", Text, nullable=False, default=""),
    Column("reason_display", Text, nullable=False, default=""),
    Column("comment", Text, nullable=False, default=""),
    Column("outcome_timestamp", String(40), nullable=False),
    Column("received_at", String(40), nullable=False),
    UniqueConstraint("idempotency_key", name="uq_feedback_idempotency_key"),
)
Index("ix_feedback_card_uuid", feedback.c.card_uuid)
