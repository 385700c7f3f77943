"""Tools for rule authors: lint, test and coverage, impact of a change (diff), explain.

Each tool is a library module with a small ``needlepoint rules …`` command beside it in
:mod:`needlepoint.cli_rules`, so the server and other programs can call the same code.
"""
