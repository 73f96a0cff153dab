"""Attempts' directory trees on a real filesystem: kept when clean, removed otherwise."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from protocol.messages import Assignment, Result
from protocol.settings import WorkerSettings
from worker import workdirs
from worker.attempt import AttemptEnv, run_attempt
from worker.workdirs import JANITOR, WorkTrees

ROOT = Path(__file__).resolve().parents[2]

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


# a worker's trees in another process: one running (41), one kept; then it waits
HOLDER = """
import sys
from pathlib import Path
from worker.workdirs import WorkTrees
root = Path(sys.argv[1])
trees = WorkTrees()
trees.make(root / "41")
trees.make(root / "42")
trees.done(root / "42", reusable=True)
print("ready", flush=True)
sys.stdin.read()
"""


def sweep(trees: WorkTrees, workdir: Path) -> list[str]:
    trees.sweep(workdir)
    JANITOR.flush()
    return sorted(os.listdir(workdir))


def test_a_sweep_removes_the_trees_of_a_worker_that_died_and_only_those(
        tmp_path: Path, trees: WorkTrees, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        theirs = sorted(os.listdir(workdir))
        assert len(theirs) == 2 and theirs[0].startswith(".kept-") and theirs[1] == "41"
        trees.make(workdir / "43")  # this process's own, running
        (workdir / "notes").mkdir()  # not an attempt's: never swept
        (workdir / "2024" / "work").mkdir(parents=True)  # named by a number, but no logs/
        (workdir / "7").write_text("a file, not a tree")
        os.symlink(tmp_path, workdir / "8")
        made = workdir / ".new-0123abcd"  # a tree being made, not yet locked
        (made / "work").mkdir(parents=True)
        everything = sorted([*theirs, "2024", "43", "notes", "7", "8", made.name])
        assert sweep(trees, workdir) == everything  # every tree is held, or being made

        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
        assert sweep(trees, workdir) == sorted(["2024", "43", "notes", "7", "8", made.name])
        assert (tmp_path / "work").is_dir()  # the symlink was not followed
        monkeypatch.setattr(workdirs, "MAKING_GRACE_SECONDS", 0.0)
        assert sweep(trees, workdir) == ["2024", "43", "7", "8", "notes"]  # made long ago
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(60)
        if holder.stdout is not None:
            holder.stdout.close()
        if holder.stdin is not None:
            holder.stdin.close()
    trees.done(workdir / "43", reusable=False)
    assert sweep(trees, workdir) == ["2024", "7", "8", "notes"]


def test_a_kept_tree_survives_sweeps_and_is_reused(tmp_path: Path, trees: WorkTrees) -> None:
    trees.make(tmp_path / "1")
    inode = (tmp_path / "1").stat().st_ino
    trees.done(tmp_path / "1", reusable=True)
    assert sweep(trees, tmp_path) == kept(tmp_path) != []
    trees.make(tmp_path / "2")
    assert sweep(trees, tmp_path) == ["2"] and (tmp_path / "2").stat().st_ino == inode
    for sub in ("logs", "work"):
        (tmp_path / "3" / sub).mkdir(parents=True)  # a dead worker's, left just now
    trees.sweep(tmp_path, every=3600)  # swept a moment ago: not again yet
    JANITOR.flush()
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    trees.done(tmp_path / "2", reusable=False)
    assert sweep(trees, tmp_path) == []


MOUNTS = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
31 27 0:40 / /home rw,relatime shared:5 - nfs4 server:/home rw,vers=4.2
32 31 0:41 / /home/a\\040b rw,relatime - tmpfs tmpfs rw
33 31 0:42 / /home/a\\040b rw,relatime - xfs /dev/vdb rw
"""


def test_the_filesystem_of_a_workdir_is_read_from_the_mount_table() -> None:
    def of(path: str) -> str:
        return workdirs.filesystem_of(Path(path), MOUNTS)

    assert of("/srv/work") == "ext4"
    assert of("/home/u/.ecloud/work") == "nfs4"
    assert of("/homework") == "ext4"  # not under /home
    assert of("/home/a b/work") == "xfs"  # the later of two mounts on one point
    assert of("/proc/1") == "proc"
    assert workdirs.filesystem_of(Path("/x"), "garbage\n") == ""


def test_no_sweep_where_a_lock_may_not_reach_other_hosts(
        tmp_path: Path, trees: WorkTrees, monkeypatch: pytest.MonkeyPatch) -> None:
    for sub in ("logs", "work"):
        (tmp_path / "5" / sub).mkdir(parents=True)  # held by no one
    monkeypatch.setattr(workdirs, "LOCAL_FILESYSTEMS", frozenset())  # as on NFS
    assert sweep(trees, tmp_path) == ["5"]
    monkeypatch.undo()
    assert sweep(trees, tmp_path) == []


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
