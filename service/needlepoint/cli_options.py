"""Command-line options shared by several commands: the evaluation instant and the order fields."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import click

from needlepoint.core.record import INTENTS, SIDES, TARGETS


def parse_instant(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """An ISO 8601 date or date-time; without a time zone it is UTC."""
    if value is None:
        return None
    try:
        instant = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date-time, e.g. 2025-06-02T09:00:00Z") from None
    return instant if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc)


def order_options(purpose: str) -> Callable:
    """``--target``, ``--side`` and ``--intent`` with the contract's codes; ``purpose`` ends each help text."""

    def decorate(command: Callable) -> Callable:
        command = click.option("--intent", type=click.Choice(INTENTS), help=f"Intent: {purpose}")(command)
        command = click.option("--side", type=click.Choice(SIDES), help=f"Side: {purpose}")(command)
        return click.option("--target", type=click.Choice(TARGETS), help=f"Injection target: {purpose}")(command)

    return decorate
