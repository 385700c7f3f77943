"""``needlepoint rules schema DIR``: write the JSON Schemas of the rule-set files, generated from
the format description by :mod:`needlepoint.rulesets.schema`."""

from __future__ import annotations

from pathlib import Path

import click

from needlepoint.rulesets.schema import write_schemas


@click.command(name="schema")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def command(directory: Path) -> None:
    """Write the JSON Schemas of the rule-set files into DIRECTORY (rulesets/schema in the
    repository), for editors to complete and check rule sets as authors type."""
    for path in write_schemas(directory):
        click.echo(path)
