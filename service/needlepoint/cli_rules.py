"""``needlepoint rules …``: the rule author's commands. Each lives beside its library code in a
module of :mod:`needlepoint.authoring` that exposes a click command named ``command``; this group
gathers them."""

from __future__ import annotations

import importlib
import pkgutil

import click

from needlepoint import authoring


@click.group(name="rules")
def rules() -> None:
    """Check, test and compare rule sets before they ship."""


for _module in sorted(m.name for m in pkgutil.iter_modules(authoring.__path__)):
    _command = getattr(importlib.import_module(f"needlepoint.authoring.{_module}"), "command", None)
    if isinstance(_command, click.Command):
        rules.add_command(_command)
