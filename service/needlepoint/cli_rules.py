"""``needlepoint rules …``: the rule author's commands, registered by name and loaded when used.

Each command is named here with the module and the click command that implement it, so that
``needlepoint`` (any command, ``--help`` included) imports none of them until one is run:
``needlepoint rules --help`` loads each only for its one-line help.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# Command name -> "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "diff": "needlepoint.cli_diff:command",
    "explain": "needlepoint.cli_explain:command",
    "lint": "needlepoint.authoring.lint:command",
    "mutate": "needlepoint.authoring.mutate:command",
    "schema": "needlepoint.authoring.schema:command",
    "test": "needlepoint.authoring.runner:command",
}


def load_command(spec: str) -> click.Command:
    """The click command that ``spec`` (``module:attribute``) names."""
    module, _, attribute = spec.partition(":")
    command = getattr(importlib.import_module(module), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{spec} is not a click command")
    return command


class LazyGroup(click.Group):
    """A click group whose commands are imported when first asked for (:data:`COMMANDS`)."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            self.add_command(load_command(self.lazy_commands[cmd_name]), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(name="rules", cls=LazyGroup, lazy_commands=COMMANDS)
def rules() -> None:
    """Check, test and compare rule sets before they ship."""
