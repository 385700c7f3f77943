"""``needlepoint cds validate FILE...``: check CDS Hooks documents against the spec's rules.

Each FILE is a discovery document, a service response or a feedback request (told apart by its
top-level keys) and is checked by :mod:`needlepoint.cdshooks.validate`. One line per problem,
``FILE: path: message``; exit 1 if any file has a problem, 2 if a file is not JSON.
"""

from __future__ import annotations

import sys

import click


@click.group()
def cds() -> None:
    """CDS Hooks tools."""


@cds.command()
@click.argument("files", nargs=-1, required=True, type=click.File("rb"))
def validate(files: tuple) -> None:
    """Check CDS Hooks discovery, response or feedback JSON against the spec (cds-resp-1…7, cds-fb-1…3)."""
    import orjson

    from needlepoint.cdshooks.validate import validate_document

    failed = False
    for handle in files:
        try:
            doc = orjson.loads(handle.read())
        except orjson.JSONDecodeError as exc:
            click.echo(f"{handle.name}: not JSON: {exc}", err=True)
            sys.exit(2)
        kind, problems = validate_document(doc)
        for problem in problems:
            click.echo(f"{handle.name}: {problem}")
        click.echo(f"{handle.name}: {kind}, {'valid' if not problems else f'{len(problems)} problem(s)'}", err=True)
        failed = failed or bool(problems)
    sys.exit(1 if failed else 0)
