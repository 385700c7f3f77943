"""Reading folders of cases: which files are inputs. (What a parsed JSON input is, and the record it
gives, is :mod:`needlepoint.intake`'s; the command line's order fields apply as every order does,
:func:`needlepoint.intake.apply_order`.)

Shared by ``needlepoint rules diff`` (folders of Bundles, CDS Hooks requests, exported requests)
and ``needlepoint batch`` (folders of Bundles, Bulk Data exports, referral lists).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# --target/--side/--intent as given on the command line (each may be None).
OrderFields = tuple[str | None, str | None, str | None]


def input_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file under ``root`` (recursively, in name order), or ``root`` itself when it is a
    file, with its path relative to ``root`` in POSIX form. Hidden files and anything under a
    hidden folder are left out."""
    if root.is_file():
        yield root, root.name
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield path, rel.as_posix()
