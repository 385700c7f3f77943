"""``needlepoint rules schema DIR``: write the JSON Schemas of the rule-set files (generated from
the format description by :mod:`needlepoint.rulesets.schema`, where the command is defined)."""

from needlepoint.rulesets.schema import command

__all__ = ["command"]
