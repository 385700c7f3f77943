"""The layering of the house holds: no import runs back up (core <- roads <- tools and servers <-
command line), by the import-linter contracts of ``pyproject.toml`` (``[tool.importlinter]``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from importlinter.api import read_configuration
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
EXIT_KEPT, EXIT_BROKEN = 0, 1


def _lint(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run import-linter on ``config``; it finds the needlepoint package on sys.path, as the tests'
    own imports do. Its logging set-up (``dictConfig``) disables every logger that exists, so the
    ones that were enabled are enabled again: later tests read their logs."""
    loggers = [logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    enabled = [logger for logger in loggers if not logger.disabled]
    try:
        code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        for logger in enabled:
            logger.disabled = False
    return code, capsys.readouterr().out


def test_every_layering_contract_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _lint(PYPROJECT, capsys)
    assert code == EXIT_KEPT, out
    contracts = read_configuration(str(PYPROJECT))["contracts_options"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out


def test_an_import_back_up_the_house_breaks_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The same checker with the layers turned upside down: the roads import the core, so a
    # contract that puts the core above them must be reported broken, naming the import.
    config = tmp_path / "upside-down.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["needlepoint"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "upside down"\ntype = "layers"\ncontainers = ["needlepoint"]\nlayers = ["core", "intake"]\n'
    )
    code, out = _lint(config, capsys)
    assert code == EXIT_BROKEN
    assert "upside down BROKEN" in out and "needlepoint.intake -> needlepoint.core" in out
