"""A push into an empty SQLite queue builds its secondary indexes after the rows.

The indexes are dropped inside the push's transaction and made again before
the commit, so whatever happens (success, a file refused after rows went in,
a second push into the then non-empty queue) the schema ends as migrated and
the indexes answer the queries they exist for.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boss.errors import PushError
from boss.service import Boss
from tests.conftest import make_settings


def write(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def chain(n: int, prefix: str = "t") -> list[dict[str, Any]]:
    """n tasks, each after the one before, each writing an output."""
    docs: list[dict[str, Any]] = []
    for i in range(n):
        doc: dict[str, Any] = {"name": f"{prefix}{i}", "commands": [{"command": ["true"]}],
                               "outputs": {f"data:{prefix}/{i}": "out"}}
        if i:
            doc["after"] = [f"{prefix}{i - 1}"]
        docs.append(doc)
    return docs


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "boss.db"


@pytest.fixture
def sqlite_boss(tmp_path: Path, db: Path) -> Iterator[Boss]:
    b = Boss(make_settings(tmp_path, f"sqlite:///{db}"))
    b.init()
    try:
        yield b
    finally:
        b.close()


def indexes(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                           "AND tbl_name IN ('tasks', 'task_edges', 'task_outputs')").fetchall()
        return {str(name): str(sql) for name, sql in rows}
    finally:
        con.close()


def query_plan(db: Path, sql: str) -> str:
    con = sqlite3.connect(db)
    try:
        return " / ".join(str(row[-1]) for row in con.execute(f"EXPLAIN QUERY PLAN {sql}"))
    finally:
        con.close()


def test_push_into_empty_queue_ends_with_the_migrated_indexes(
        sqlite_boss: Boss, db: Path, tmp_path: Path) -> None:
    before = indexes(db)
    assert "ix_tasks_claim_order" in before and "ix_task_edges_child_id" in before
    result = sqlite_boss.push(write(tmp_path / "a.jsonl", chain(3000)))
    assert (result.pushed, result.edges, result.ready) == (3000, 2999, 1)
    assert indexes(db) == before
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # the rebuilt child index holds every edge
        assert con.execute("SELECT count(*) FROM task_edges INDEXED BY ix_task_edges_child_id "
                           "WHERE child_id > 0").fetchone() == (2999,)
        assert con.execute("SELECT count(*) FROM tasks INDEXED BY ix_tasks_claim_order "
                           "WHERE state = 'waiting'").fetchone() == (2999,)
    finally:
        con.close()
    assert "ix_task_edges_child_id" in query_plan(
        db, "SELECT parent_id FROM task_edges WHERE child_id = 5")


def test_refused_push_into_empty_queue_keeps_the_indexes(
        sqlite_boss: Boss, db: Path, tmp_path: Path) -> None:
    before = indexes(db)
    docs = chain(3000)
    docs[0]["after"] = ["t2999"]  # a cycle through every task, found only at the end
    with pytest.raises(PushError, match="dependency cycle"):
        sqlite_boss.push(write(tmp_path / "cycle.jsonl", docs))
    assert indexes(db) == before
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM task_edges").fetchone() == (0,)
    finally:
        con.close()


def test_push_into_a_queue_with_tasks_keeps_the_indexes(
        sqlite_boss: Boss, db: Path, tmp_path: Path) -> None:
    before = indexes(db)
    sqlite_boss.push(write(tmp_path / "a.jsonl", chain(50, "a")))
    docs = chain(50, "b")
    docs[0]["after"] = ["a49"]  # a parent in the database
    docs[1]["inputs"] = {"data:a/3": "in"}  # a writer in the database
    result = sqlite_boss.push(write(tmp_path / "b.jsonl", docs))
    assert (result.pushed, result.edges, result.ready) == (50, 51, 0)
    assert indexes(db) == before
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*) FROM task_edges").fetchone() == (49 + 51,)
    finally:
        con.close()
