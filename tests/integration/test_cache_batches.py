"""The input cache's cheaper paths, with real files, threads, processes and sshd.

A directory input is fetched inside ``Cache.batch`` (room reserved a chunk at
a time, the unused part given back), entries are renamed in without an fsync
(a boot marker drops them after a reboot), and a caller's copy is a separate
file. What must hold whatever the path: the bound, the bytes, no partial
entry, no leftover, and a crashed holder's reservation swept.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from fsspec.implementations.local import LocalFileSystem

from protocol.document import parse_remote
from tests import sshd as sshd_helper
from tests import waiting
from tests.sshd import Sshd
from worker import datastore
from worker.cache import BOOT_ID, Cache
from worker.datastore import Datastore, FileSystem, copy_in, sftp_pool

sshd = sshd_helper.sshd  # the fixture

REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds; a bound on every wait, never an expectation


def local_fs() -> LocalFileSystem:
    return LocalFileSystem(skip_instance_cache=True)


def make_tree(top: Path, files: int, size: int, tag: str = "") -> dict[str, bytes]:
    """``files`` files of ``size`` bytes under ``top`` in two subdirectories."""
    out = {}
    for i in range(files):
        rel = f"d{i % 2}/f{i:03d}"
        data = (f"{tag}{i:03d}".encode() * size)[:size]
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
        out[rel] = data
    return out


def tree(top: Path) -> dict[str, bytes]:
    return {p.relative_to(top).as_posix(): p.read_bytes() for p in top.rglob("*") if p.is_file()}


def leftovers(cache: Cache) -> list[str]:
    return sorted(p.name for p in (cache.root / "tmp").iterdir())


def bound(cache: Cache) -> int:
    return int((cache.root / "usage").read_text())


# ---- batches ------------------------------------------------------------------------------


def test_a_batch_gives_back_the_room_it_did_not_use(tmp_path: Path) -> None:
    """20 files of 100 bytes under a bound of 10,000: room is reserved in chunks of
    625 (a 16th of the bound), 2,500 in all; the 500 not used go back when it ends."""
    files = make_tree(tmp_path / "remote", 20, 100)
    cache = Cache(tmp_path / "cache", 10_000)
    seen: list[int] = []

    def fetch(fs: FileSystem, rpath: str, local: Path) -> int:
        size = cache.fetch(fs, rpath, local)
        seen.append(cache.usage())  # counted, reservations included: never over the bound
        return size

    moved = copy_in(local_fs(), f"{tmp_path / 'remote'}/", tmp_path / "work", fetch=fetch,
                    batch=cache.batch)
    assert moved == 2000
    assert tree(tmp_path / "work") == files
    assert max(seen) <= 10_000
    assert cache.usage() == bound(cache) == 2000
    assert len(cache.entries()) == 20
    assert (cache.downloads, cache.hits) == (20, 0)
    assert leftovers(cache) == []

    # a warm copy reserves nothing and leaves the bound as it was
    copy_in(local_fs(), f"{tmp_path / 'remote'}/", tmp_path / "again", fetch=cache.fetch,
            batch=cache.batch)
    assert tree(tmp_path / "again") == files
    assert (cache.downloads, cache.hits) == (20, 20)
    assert cache.usage() == bound(cache) == 2000


def test_batches_in_threads_stay_within_a_bound_they_overflow(tmp_path: Path) -> None:
    """Two directories of 1,000 bytes each, at once, under a bound of 1,200: what fits is
    cached (evicting the other's entries), the rest bypasses the cache; every copy is
    right and the entries never pass 1,200."""
    sources = {name: make_tree(tmp_path / name, 10, 100, tag=name) for name in ("a", "b")}
    cache = Cache(tmp_path / "cache", 1200)
    peaks: list[int] = []

    def fetch(fs: FileSystem, rpath: str, local: Path) -> int:
        size = cache.fetch(fs, rpath, local)
        # what the entries hold (usage() may count a file moving from a room to an
        # entry twice for a moment: an upper bound, like the bound itself)
        peaks.append(sum(e.size for e in cache.entries()))
        return size

    def slot(name: str) -> None:
        copy_in(local_fs(), f"{tmp_path / name}/", tmp_path / f"work-{name}", fetch=fetch,
                batch=cache.batch)

    waiting.run_in_threads(slot, [(name,) for name in sources], WAIT)
    for name, files in sources.items():
        assert tree(tmp_path / f"work-{name}") == files
    assert max(peaks) <= 1200
    assert cache.usage() <= bound(cache) <= 1200
    assert leftovers(cache) == []
    assert cache.downloads == 20  # bypasses count as downloads too
    for entry in cache.entries():
        assert (cache.root / "entries" / entry.key).read_bytes() in [
            data for files in sources.values() for data in files.values()]


# A worker process that reserves room for a batch, downloads one file inside it,
# says so in GATE and then waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from fsspec.implementations.local import LocalFileSystem
from worker.cache import Cache

root, rpath, dest, gate = sys.argv[1:5]
cache = Cache(root, 10**6)
with cache.batch(50_000):
    cache.fetch(LocalFileSystem(skip_instance_cache=True), rpath, Path(dest))
    Path(gate, "inside").touch()
    time.sleep(60)
"""


def test_a_crashed_batch_s_reservation_is_swept(tmp_path: Path) -> None:
    src = tmp_path / "remote" / "in"
    src.parent.mkdir()
    src.write_bytes(b"r" * 100)
    gate = tmp_path / "gate"
    gate.mkdir()
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(src),
                             str(tmp_path / "dead" / "in"), str(gate)], cwd=REPO)
    try:
        waiting.wait_for(lambda: (gate / "inside").exists(), "the batch to download a file",
                         WAIT, every=0.005)
        cache = Cache(root, 10**6)
        # the live batch reserved 50,000 bytes (its total; a 16th of the bound is more)
        # and filled 100 of them with an entry: its room file holds the rest, counted
        # beside the entry, and kept
        (room,) = leftovers(cache)
        assert room.endswith(".room")
        assert (root / "tmp" / room).stat().st_size == 49_900
        assert cache.usage() == 50_000
        assert leftovers(cache) == [room]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
    assert cache.usage() == 100  # the dead process's room is swept; its entry stays
    assert leftovers(cache) == []
    cache.fetch(local_fs(), str(src), tmp_path / "alive" / "in")
    assert (cache.downloads, cache.hits) == (0, 1)


# ---- no fsync per entry: the boot marker --------------------------------------------------


def current_boot() -> str:
    return Path(BOOT_ID).read_text().strip()


def test_entries_added_in_another_boot_are_dropped(tmp_path: Path) -> None:
    """Entries are renamed in without an fsync; a machine that restarted since may hold
    any of them partially, so a cache that finds another boot recorded drops them all."""
    files = {name: tmp_path / "remote" / name for name in ("a", "b")}
    for name, path in files.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(name.encode() * 1000)
    cache = Cache(tmp_path / "cache", 10**6)
    for name, path in files.items():
        cache.fetch(local_fs(), str(path), tmp_path / "one" / name)
    marker = tmp_path / "cache" / "boot"
    assert marker.read_text() == current_boot()
    assert len(Cache(tmp_path / "cache", 10**6).entries()) == 2  # same boot: kept

    marker.write_text("an-earlier-boot")  # as the kernel of a crashed boot left it
    stale = tmp_path / "cache" / "tmp" / f"{'0' * 64}.dead.2000.part"
    stale.write_bytes(b"partial")
    again = Cache(tmp_path / "cache", 10**6)
    assert again.entries() == []
    assert leftovers(again) == []
    assert again.usage() == 0
    assert marker.read_text() == current_boot()
    for name, path in files.items():
        again.fetch(local_fs(), str(path), tmp_path / "two" / name)
        assert (tmp_path / "two" / name).read_bytes() == name.encode() * 1000
    assert (again.downloads, again.hits) == (2, 0)


def test_a_cache_without_a_boot_marker_keeps_its_entries(tmp_path: Path) -> None:
    """A cache written before the marker existed fsynced every entry: nothing to drop."""
    src = tmp_path / "in"
    src.write_bytes(b"kept" * 100)
    Cache(tmp_path / "cache", 10**6).fetch(local_fs(), str(src), tmp_path / "one")
    (tmp_path / "cache" / "boot").unlink()
    cache = Cache(tmp_path / "cache", 10**6)
    cache.fetch(local_fs(), str(src), tmp_path / "two")
    assert (cache.downloads, cache.hits) == (0, 1)
    assert (tmp_path / "cache" / "boot").read_text() == current_boot()


# ---- the copy a caller gets ---------------------------------------------------------------


def test_a_caller_s_copy_is_its_own_file(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    cache = Cache(tmp_path / "cache", 10**9)
    dest = tmp_path / "work" / "deep" / "er" / "big.bin"  # no directory there yet
    assert cache.fetch(local_fs(), str(src), dest) == len(data)
    (entry,) = cache.entries()
    cached = cache.root / "entries" / entry.key
    assert dest.read_bytes() == data
    assert os.stat(dest).st_ino != os.stat(cached).st_ino
    assert os.stat(cached).st_nlink == 1  # never linked out to a work directory
    with dest.open("r+b") as f:  # a command writing into its input in place
        f.write(b"X" * 1000)
    assert cached.read_bytes() == data
    cache.fetch(local_fs(), str(src), tmp_path / "second")
    assert (tmp_path / "second").read_bytes() == data


# ---- over sftp ----------------------------------------------------------------------------


@pytest.mark.sshd
def test_an_sftp_directory_in_one_batch(sshd: Sshd, tmp_path: Path) -> None:
    """The OpenSSH path (threads, one sftp process each) writing straight into the cache's
    temporary names, inside one batch: entries, bytes and the bound all exact."""
    root = tmp_path / "remote"
    files = make_tree(root / "t", datastore.BULK_FILES + 8, 300)
    url = (f"sftp://{sshd.user}@{sshd.host}:{sshd.port}{root}"
           f"?key_filename={quote(str(sshd.client_key_path))}"
           f"&known_hosts={quote(str(sshd.known_hosts_path))}")
    cache = Cache(tmp_path / "cache", 10 << 20)
    for attempt in (1, 2):
        with Datastore({}, url) as store:
            fs, rpath = store.resolve(parse_remote("default:t/"))
            assert sftp_pool(fs) is not None
            moved = copy_in(fs, rpath, tmp_path / f"work{attempt}", fetch=cache.fetch,
                            batch=cache.batch)
        assert moved == sum(len(d) for d in files.values())
        assert tree(tmp_path / f"work{attempt}") == files
    assert (cache.downloads, cache.hits) == (len(files), len(files))
    assert cache.usage() == bound(cache) == sum(len(d) for d in files.values())
    assert leftovers(cache) == []
    assert not [p for p in tmp_path.rglob("*") if ".ecloud-part-" in p.name]
