"""The decision log: every decision, from every road, in a real database, with its replay input.

* :class:`DecisionLog` (``writer``): group-committing writer; ``record(entry)`` returns a future
  that resolves once the entry is committed; ``record_feedback`` stores CDS Hooks feedback.
* :class:`DecisionEntry` / :class:`CardRef` (``entries``): what a road hands the log.
* :class:`FeedbackStore` (``store``): what the CDS Hooks service uses for feedback and the
  overrides report.
* ``database``: URLs (SQLite by default, PostgreSQL in production), connections, migrations.
* ``masking``: which direct identifiers are removed from the stored replay input.
* ``report`` and ``export``: ``needlepoint decisions overrides`` and ``decisions export``.
"""

from needlepoint.decisionlog.database import default_url, migrate
from needlepoint.decisionlog.entries import CardRef, DecisionEntry
from needlepoint.decisionlog.feedback import FeedbackError
from needlepoint.decisionlog.masking import Masker
from needlepoint.decisionlog.writer import DecisionLog, LogUnavailable, NotMigrated

__all__ = [
    "CardRef",
    "DecisionEntry",
    "DecisionLog",
    "FeedbackError",
    "LogUnavailable",
    "Masker",
    "NotMigrated",
    "default_url",
    "migrate",
]
