"""Fixtures for the acceptance tests: the ``boss`` command in a fresh directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.helpers import Cli, write_settings


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """``boss --settings FILE`` with a SQLite database and datastore under tmp_path."""
    return Cli(tmp_path, write_settings(tmp_path))
