"""Tools for rule authors: lint, test and coverage, mutants, impact of a change (diff).

Each tool is a library module; its ``needlepoint rules …`` command is registered by name in
:mod:`needlepoint.cli_rules` and loaded only when run. Explaining a decision is the core's
(:mod:`needlepoint.core.explain`), so the server's Explain RPC does not depend on these tools.
"""
