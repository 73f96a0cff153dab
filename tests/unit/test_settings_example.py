"""settings.example.toml names every setting, with its default and its variable.

The file is documentation; these tests keep it from drifting away from
``protocol/settings.py`` when a setting is added, renamed or changes default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from protocol.settings import ENV_PREFIX, TABLES, Settings, absolutize, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "settings.example.toml"


def _fields() -> list[tuple[str, str]]:
    return [(table, key) for table, model in TABLES.items() for key in model.model_fields]


def test_tables_cover_the_settings_model() -> None:
    """Every table of Settings is in TABLES (else the checks below would miss it)."""
    assert set(Settings.model_fields) - {"source"} == set(TABLES)


@pytest.mark.parametrize(("table", "key"), _fields(), ids=lambda v: str(v))
def test_every_key_is_written_out(table: str, key: str) -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert key in raw.get(table, {}), (
        f"settings.example.toml has no `{key}` in [{table}]: add it with its default "
        "and a comment naming its environment variable")


@pytest.mark.parametrize(("table", "key"), _fields(), ids=lambda v: str(v))
def test_every_key_names_its_variable(table: str, key: str) -> None:
    var = f"{ENV_PREFIX}{table.upper()}_{key.upper()}"
    assert var in EXAMPLE.read_text(encoding="utf-8"), (
        f"settings.example.toml does not mention {var} (the override of [{table}] {key})")


def test_no_unknown_tables() -> None:
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert set(raw) <= set(TABLES)


def test_values_are_the_defaults(tmp_path: Path) -> None:
    loaded = load_settings(str(EXAMPLE), environ={}, cwd=tmp_path)
    defaults = absolutize(Settings(), tmp_path.resolve())
    assert loaded.source == str(EXAMPLE)
    for table in TABLES:
        assert getattr(loaded, table) == getattr(defaults, table), (
            f"[{table}] in settings.example.toml differs from the defaults in "
            "protocol/settings.py")
