"""Attempts' directory trees on a real filesystem: kept when clean, removed otherwise."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from worker.attempt import AttemptEnv, run_attempt
from worker.workdirs import JANITOR, WorkTrees

_ids = itertools.count(9000)


def kept(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".kept-"))


def ends_removed(trees: WorkTrees, path: Path, *, reusable: bool = True) -> bool:
    """Whether the tree at ``path`` is removed (not kept) when its attempt ends."""
    trees.done(path, reusable=reusable)
    JANITOR.flush()
    return not path.exists() and kept(path.parent) == []


@pytest.fixture
def trees() -> WorkTrees:
    return WorkTrees()


def test_a_clean_tree_is_kept_and_made_again_for_the_next_attempt(tmp_path: Path,
                                                                    trees: WorkTrees) -> None:
    trees.make(tmp_path / "1")
    (tmp_path / "1" / "logs" / "0.stdout").write_bytes(b"")  # an empty log: kept
    (tmp_path / "1" / "logs" / "0.stderr").write_bytes(b"what task 1 said\n")
    inode = (tmp_path / "1" / "work").stat().st_ino
    trees.done(tmp_path / "1", reusable=True)
    assert not (tmp_path / "1").exists()
    assert len(kept(tmp_path)) == 1

    trees.make(tmp_path / "2")
    assert kept(tmp_path) == []
    assert (tmp_path / "2" / "work").stat().st_ino == inode  # renamed, not made
    assert os.listdir(tmp_path / "2" / "work") == []
    # no output of task 1 shows through in task 2's tree
    assert os.listdir(tmp_path / "2" / "logs") == ["0.stdout"]
    assert (tmp_path / "2" / "logs" / "0.stdout").read_bytes() == b""


def test_a_tree_left_with_anything_in_it_is_removed(tmp_path: Path, trees: WorkTrees) -> None:
    def made(name: str) -> Path:
        trees.make(tmp_path / name)
        return tmp_path / name

    root = made("file")
    (root / "work" / "left").write_text("x")
    assert ends_removed(trees, root)

    root = made("beside")
    (root / "stray").write_text("x")
    assert ends_removed(trees, root)

    root = made("link")  # work made a link to an empty directory elsewhere
    (tmp_path / "elsewhere").mkdir()
    (root / "work").rmdir()
    (root / "work").symlink_to(tmp_path / "elsewhere")
    assert ends_removed(trees, root)
    assert (tmp_path / "elsewhere").is_dir()  # the link is removed, not what it points to

    root = made("mode")
    (root / "work").chmod(0o700 if (root / "work").stat().st_mode & 0o077 else 0o755)
    assert ends_removed(trees, root)

    root = made("hardlink")  # the next attempt's truncation would reach the other name
    (tmp_path / "precious").write_bytes(b"")
    os.link(tmp_path / "precious", root / "logs" / "0.stdout")
    trees.done(root, reusable=True)
    trees.make(tmp_path / "next")
    assert os.listdir(tmp_path / "next" / "logs") == []
    assert (tmp_path / "precious").exists()
    assert ends_removed(trees, tmp_path / "next", reusable=False)

    root = made("container")  # an attempt in a container is never kept
    assert ends_removed(trees, root, reusable=False)


def test_making_a_tree_replaces_a_crashed_runs_leftover_and_survives_a_vanished_one(
        tmp_path: Path, trees: WorkTrees) -> None:
    trees.make(tmp_path / "a")
    trees.done(tmp_path / "a", reusable=True)
    (tmp_path / "b" / "work").mkdir(parents=True)
    (tmp_path / "b" / "work" / "stale").write_text("x")
    trees.make(tmp_path / "b")
    assert os.listdir(tmp_path / "b" / "work") == []

    trees.done(tmp_path / "b", reusable=True)
    for name in kept(tmp_path):
        shutil.rmtree(tmp_path / name)  # gone under the worker
    trees.make(tmp_path / "c")
    assert sorted(os.listdir(tmp_path / "c")) == ["logs", "work"]


def test_closing_removes_the_kept_trees_and_those_ending_later(tmp_path: Path,
                                                                trees: WorkTrees) -> None:
    for name in ("a", "b"):
        trees.make(tmp_path / name)
    trees.done(tmp_path / "a", reusable=True)
    assert len(kept(tmp_path)) == 1
    trees.close()
    trees.done(tmp_path / "b", reusable=True)  # a slot that outlived the worker's wait
    JANITOR.flush()
    assert os.listdir(tmp_path) == []


def run(env: AttemptEnv, command: str) -> Result:
    aid = next(_ids)
    doc: dict[str, Any] = {"commands": [{"command": [command], "shell": True}]}
    result = run_attempt(Assignment(aid, 1, "t", 1, doc), env, lambda _k, _d: None,
                         threading.Event())
    JANITOR.flush()
    return result


def test_attempts_in_a_row_see_an_empty_work_dir_and_no_earlier_log(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    env = AttemptEnv(workdir_root=tmp_path / "work", cache=None, buckets={},
                     default_url=bucket.as_uri(), settings=WorkerSettings())
    check = ('test -z "$(ls -A)" && ! grep -r . ../logs && echo "$PWD" >> '
             f'{tmp_path / "dirs"}')
    assert run(env, check).outcome == "succeeded"
    assert run(env, "echo said by the first; echo and on stderr >&2").outcome == "succeeded"
    assert run(env, check).outcome == "succeeded"
    assert len(kept(env.workdir_root)) == 1  # one tree, reused by each attempt in turn
    assert run(env, "echo left > here").outcome == "succeeded"
    assert kept(env.workdir_root) == []  # a dirty tree is removed, not kept
    assert run(env, check).outcome == "succeeded"
    dirs = (tmp_path / "dirs").read_text().split()
    assert len(dirs) == 3 and len(set(dirs)) == 3  # each under its own attempt id
    env.trees.close()  # waits for the janitor: nothing is left once it returns
    assert os.listdir(env.workdir_root) == []
