"""The per-host input cache with real files, real threads and real processes.

Concurrency is made deterministic with a *gate*: a local filesystem whose
``get_file`` copies half the file and then waits for the test to open the
gate. While it waits, the download is provably in progress, so the other
threads or processes are provably waiting for it (or about to), and the test
can assert that exactly one download happened, not merely hope the timing
overlapped. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fsspec.implementations.local import LocalFileSystem

from tests import sshd as sshd_helper
from tests import waiting
from tests.sshd import Sshd
from worker.cache import Cache
from worker.datastore import Datastore
from worker.errors import CacheError, CancelledError, RemoteNotFoundError

sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811

REPO = Path(__file__).resolve().parents[2]
WAIT = 30.0  # seconds; a bound on every wait, never an expectation


def wait_for(condition: Callable[[], bool], what: str, bound: float = WAIT) -> None:
    waiting.wait_for(condition, what, bound, every=0.005)


class GatedFS(LocalFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """The local filesystem, with a download that stops halfway until ``go`` is set."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.go = threading.Event()
        self.go.set()
        self.lock = threading.Lock()
        self.info_threads: set[int] = set()
        self.downloads_started = 0

    @classmethod
    def new(cls, *, gated: bool = False) -> GatedFS:
        fs: GatedFS = cls(skip_instance_cache=True)
        if gated:
            fs.go.clear()
        return fs

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        with self.lock:
            self.info_threads.add(threading.get_ident())
        result: dict[str, Any] = super().info(path, **kwargs)
        return result

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        with self.lock:
            self.downloads_started += 1
        data = Path(rpath).read_bytes()
        with open(lpath, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            if not self.go.wait(WAIT):
                raise TimeoutError("the test never opened the gate")
            out.write(data[len(data) // 2:])


# A separate worker process fetching through its own Cache object; its filesystem
# marks what it reached in GATE and waits for GATE/go in the middle of a download.
PROCESS = """
import json, os, sys, time
from pathlib import Path
from fsspec.implementations.local import LocalFileSystem
from worker.cache import Cache

root, rpath, dest, gate = sys.argv[1:5]

class Gated(LocalFileSystem):
    def info(self, path, **kw):
        Path(gate, f"seen-{os.getpid()}").touch()
        return super().info(path, **kw)

    def get_file(self, src, dst, **kw):
        data = Path(src).read_bytes()
        with open(dst, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            Path(gate, f"downloading-{os.getpid()}").touch()
            deadline = time.monotonic() + 30
            while not Path(gate, "go").exists():
                if time.monotonic() > deadline:
                    sys.exit("the test never opened the gate")
                time.sleep(0.005)
            out.write(data[len(data) // 2:])

cache = Cache(root, 10**9)
size = cache.fetch(Gated(skip_instance_cache=True), rpath, Path(dest))
print(json.dumps({"downloads": cache.downloads, "hits": cache.hits, "size": size}))
"""


def start_process(root: Path, rpath: Path, dest: Path, gate: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PROCESS, str(root), str(rpath), str(dest),
                             str(gate)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def remote_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "remote" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def entry_contents(cache: Cache) -> list[bytes]:
    """The cached files' contents, least recently used first."""
    return [(cache.root / "entries" / e.key).read_bytes() for e in cache.entries()]


def leftovers(cache: Cache) -> list[str]:
    return sorted(p.name for p in (cache.root / "tmp").iterdir())


# ---- download once ------------------------------------------------------------------------


def test_threads_fetching_the_same_input_download_it_once(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = remote_file(tmp_path, "big.bin", data)
    cache = Cache(tmp_path / "cache", 10**9)
    fs = GatedFS.new(gated=True)
    n = 4
    errors: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            assert cache.fetch(fs, str(src), tmp_path / f"slot{i}" / "big.bin") == len(data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    # every slot has asked for the file and one of them is halfway through downloading it
    wait_for(lambda: len(fs.info_threads) >= n and fs.downloads_started >= 1,
             "every thread to ask and one to download")
    fs.go.set()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert fs.downloads_started == 1
    assert (cache.downloads, cache.hits) == (1, n - 1)
    for i in range(n):
        assert (tmp_path / f"slot{i}" / "big.bin").read_bytes() == data
    assert entry_contents(cache) == [data]
    assert leftovers(cache) == []


def test_processes_fetching_the_same_input_download_it_once(tmp_path: Path) -> None:
    data = os.urandom(200_000)
    src = remote_file(tmp_path, "big.bin", data)
    gate = tmp_path / "gate"
    gate.mkdir()
    root = tmp_path / "cache"
    procs = [start_process(root, src, tmp_path / f"proc{i}" / "big.bin", gate) for i in range(2)]
    try:
        wait_for(lambda: len(list(gate.glob("seen-*"))) == 2
                 and len(list(gate.glob("downloading-*"))) == 1,
                 "both processes to ask and one to download")
        # the other process cannot finish before the download does
        assert [p.poll() for p in procs] == [None, None]
        (gate / "go").touch()
        outs = [p.communicate(timeout=WAIT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=WAIT)
    assert [p.returncode for p in procs] == [0, 0], outs
    reports = [json.loads(out) for out, _ in outs]
    assert sum(r["downloads"] for r in reports) == 1
    assert sum(r["hits"] for r in reports) == 1
    assert len(list(gate.glob("downloading-*"))) == 1
    for i in range(2):
        assert (tmp_path / f"proc{i}" / "big.bin").read_bytes() == data
    assert entry_contents(Cache(root, 10**9)) == [data]


@pytest.mark.sshd
def test_two_sftp_connections_share_entries(sshd: Sshd, tmp_path: Path) -> None:
    src = remote_file(tmp_path, "in.txt", b"over sftp\n" * 100)
    url = (f"sftp://{sshd.user}@{sshd.host}:{sshd.port}{src.parent}"
           f"?key_filename={quote(str(sshd.client_key_path))}"
           f"&known_hosts={quote(str(sshd.known_hosts_path))}")
    cache = Cache(tmp_path / "cache", 10**9)
    for i in range(2):  # two attempts, each with its own connection
        with Datastore({}, url) as store:
            loc = store.location("default")
            cache.fetch(loc.fs, loc.path("in.txt"), tmp_path / f"a{i}")
        assert (tmp_path / f"a{i}").read_bytes() == src.read_bytes()
    assert (cache.downloads, cache.hits) == (1, 1)


# ---- bound and LRU ------------------------------------------------------------------------


def test_byte_bound_with_lru_eviction(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 300)
    files = {name: remote_file(tmp_path, name, name.encode() * 100) for name in "abcde"}

    def fetch(name: str) -> None:
        dest = tmp_path / "work" / name
        cache.fetch(fs, str(files[name]), dest)
        assert dest.read_bytes() == name.encode() * 100
        assert cache.usage() <= 300

    for name in "abc":
        fetch(name)
    assert entry_contents(cache) == [b"a" * 100, b"b" * 100, b"c" * 100]
    fetch("a")  # a hit makes "a" the most recently used
    assert entry_contents(cache) == [b"b" * 100, b"c" * 100, b"a" * 100]
    fetch("d")  # evicts "b", the least recently used
    assert entry_contents(cache) == [b"c" * 100, b"a" * 100, b"d" * 100]
    fetch("e")
    assert entry_contents(cache) == [b"a" * 100, b"d" * 100, b"e" * 100]
    assert (cache.downloads, cache.hits) == (5, 1)

    # larger than the whole bound: served, never cached, nothing evicted for it
    huge = remote_file(tmp_path, "huge", b"h" * 301)
    assert cache.fetch(fs, str(huge), tmp_path / "work" / "huge") == 301
    assert (tmp_path / "work" / "huge").read_bytes() == b"h" * 301
    assert entry_contents(cache) == [b"a" * 100, b"d" * 100, b"e" * 100]
    assert cache.usage() == 300
    assert leftovers(cache) == []


def test_the_usage_bound_is_counted_only_when_a_download_may_not_fit(tmp_path: Path) -> None:
    """Each reservation adds to ROOT/usage without counting the entries (a directory of
    many inputs would count them once per file); a bound that errs high (an entry gone
    behind the cache's back, a damaged file) is corrected by the count it triggers."""
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 300)
    files = {name: remote_file(tmp_path, name, name.encode() * 100) for name in "abcde"}
    bound = cache.root / "usage"
    for name in "abc":
        cache.fetch(fs, str(files[name]), tmp_path / "work" / name)
    assert int(bound.read_text()) == cache.usage() == 300
    gone = cache.entries()[0]
    (cache.root / "entries" / gone.key).unlink()  # removed by hand: the bound is now high
    cache.fetch(fs, str(files["d"]), tmp_path / "work" / "d")
    # 300 + 100 did not fit under the bound, so the entries were counted: 200, room for
    # "d" without evicting anything
    assert len(cache.entries()) == 3 and int(bound.read_text()) == cache.usage() == 300
    bound.write_text("garbage")  # a crash mid-write
    cache.fetch(fs, str(files["e"]), tmp_path / "work" / "e")
    assert int(bound.read_text()) == cache.usage() == 300
    assert [e.size for e in cache.entries()] == [100, 100, 100]
    assert (cache.downloads, cache.hits) == (5, 0)


def test_concurrent_fetches_stay_within_the_bound(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 1000)
    files = [remote_file(tmp_path, f"f{i}", bytes([i]) * 300) for i in range(8)]

    def slot(n: int) -> None:
        rng = random.Random(n)
        for j in range(15):
            i = rng.randrange(len(files))
            dest = tmp_path / f"slot{n}" / f"{j}"
            cache.fetch(fs, str(files[i]), dest)
            assert dest.read_bytes() == bytes([i]) * 300
            assert cache.usage() <= 1000

    waiting.run_in_threads(slot, [(n,) for n in range(4)], WAIT)
    assert cache.usage() <= 1000
    assert cache.downloads + cache.hits == 60
    assert leftovers(cache) == []
    for content in entry_contents(cache):
        assert content in [f.read_bytes() for f in files]


def test_an_entry_in_use_is_not_evicted(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 300)
    files = {name: remote_file(tmp_path, name, name.encode() * 100) for name in "abcde"}
    with cache.pin(fs, str(files["a"])) as pinned:
        assert pinned
        for name in "bcde":  # each needs room; "a" is the oldest but in use
            cache.fetch(fs, str(files[name]), tmp_path / "work" / name)
            assert b"a" * 100 in entry_contents(cache)
            assert cache.usage() <= 300
        assert entry_contents(cache) == [b"a" * 100, b"d" * 100, b"e" * 100]
        assert not cache.evict(300)  # cannot make room for 300 while "a" is held
        assert entry_contents(cache) == [b"a" * 100]
    assert cache.evict(300)
    assert entry_contents(cache) == []


def test_no_room_while_everything_is_in_use_bypasses_the_cache(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 200)
    a = remote_file(tmp_path, "a", b"a" * 100)
    b = remote_file(tmp_path, "b", b"b" * 100)
    c = remote_file(tmp_path, "c", b"c" * 100)
    with cache.pin(fs, str(a)), cache.pin(fs, str(b)):
        assert cache.fetch(fs, str(c), tmp_path / "c") == 100
        assert (tmp_path / "c").read_bytes() == b"c" * 100
        with cache.pin(fs, str(c)) as pinned:
            assert not pinned  # nothing pinned: it was not cached
    assert entry_contents(cache) == [b"a" * 100, b"b" * 100]


# ---- versions -----------------------------------------------------------------------------


def test_a_changed_remote_file_is_a_new_entry(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 10**6)
    src = remote_file(tmp_path, "in", b"first version\n")
    dest = tmp_path / "work" / "in"
    cache.fetch(fs, str(src), dest)
    assert dest.read_bytes() == b"first version\n"

    src.write_bytes(b"second, longer version\n")  # size changes
    cache.fetch(fs, str(src), dest)
    assert dest.read_bytes() == b"second, longer version\n"

    st = src.stat()
    src.write_bytes(b"third, samesize version\n"[:len(b"second, longer version\n")])
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # only mtime changes
    cache.fetch(fs, str(src), dest)
    assert dest.read_bytes() == b"third, samesize version\n"[:23]

    cache.fetch(fs, str(src), dest)  # unchanged since: a hit
    assert (cache.downloads, cache.hits) == (3, 1)
    assert len(cache.entries()) == 3  # the old versions age out through the LRU


def test_a_damaged_entry_is_downloaded_again(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 10**6)
    src = remote_file(tmp_path, "in", b"x" * 1000)
    cache.fetch(fs, str(src), tmp_path / "one")
    (entry,) = cache.entries()
    path = cache.root / "entries" / entry.key
    path.chmod(0o644)
    path.write_bytes(b"x" * 10)  # truncated behind the cache's back
    cache.fetch(fs, str(src), tmp_path / "two")
    assert (tmp_path / "two").read_bytes() == b"x" * 1000
    assert cache.downloads == 2


def test_callers_get_a_copy(tmp_path: Path) -> None:
    fs = GatedFS.new()
    cache = Cache(tmp_path / "cache", 10**6)
    src = remote_file(tmp_path, "in", b"pristine")
    cache.fetch(fs, str(src), tmp_path / "one")
    (tmp_path / "one").write_bytes(b"modified by a command")
    cache.fetch(fs, str(src), tmp_path / "two")
    assert (tmp_path / "two").read_bytes() == b"pristine"
    assert cache.hits == 1


def test_missing_input_is_remote_not_found(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", 10**6)
    with pytest.raises(RemoteNotFoundError):
        cache.fetch(GatedFS.new(), str(tmp_path / "absent"), tmp_path / "x")
    assert cache.entries() == []


# ---- crashes, cancel and waits ------------------------------------------------------------


def test_crash_leftovers_are_swept(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    src = remote_file(tmp_path, "in.bin", data)
    gate = tmp_path / "gate"
    gate.mkdir()
    root = tmp_path / "cache"
    proc = start_process(root, src, tmp_path / "dead" / "in.bin", gate)
    try:
        wait_for(lambda: any(gate.glob("downloading-*")), "the download to start")
        cache = Cache(root, 10**9)
        # a live download's reservation is counted and kept ...
        assert len(leftovers(cache)) == 1
        assert leftovers(cache)[0].endswith(f".{len(data)}.part")
        assert cache.usage() == len(data)
        assert len(leftovers(cache)) == 1
    finally:
        proc.send_signal(signal.SIGKILL)  # the worker crashes mid-download
        proc.communicate(timeout=WAIT)
    # ... a dead one's is swept by the next look at the space
    assert cache.usage() == 0
    assert leftovers(cache) == []
    assert cache.entries() == []
    cache.fetch(GatedFS.new(), str(src), tmp_path / "alive" / "in.bin")
    assert (tmp_path / "alive" / "in.bin").read_bytes() == data
    assert cache.downloads == 1
    assert [e.size for e in cache.entries()] == [len(data)]


def test_leftover_beside_a_cached_entry_is_swept(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", 10**6)
    src = remote_file(tmp_path, "in", b"z" * 50)
    fs = GatedFS.new()
    cache.fetch(fs, str(src), tmp_path / "one")
    (entry,) = cache.entries()
    # a crashed re-download of the same key (e.g. after the entry was damaged)
    stale = cache.root / "tmp" / f"{entry.key}.deadbeef.50.part"
    stale.write_bytes(b"z" * 20)
    assert cache.usage() == 50  # swept, not counted as a reservation
    assert leftovers(cache) == []
    assert cache.entries() == [entry]  # the complete entry stays
    cache.fetch(fs, str(src), tmp_path / "two")
    assert (cache.downloads, cache.hits) == (1, 1)


def test_cancel_while_waiting_for_another_download(tmp_path: Path) -> None:
    src = remote_file(tmp_path, "in", b"w" * 1000)
    cache = Cache(tmp_path / "cache", 10**6)
    fs = GatedFS.new(gated=True)
    first = threading.Thread(target=cache.fetch, args=(fs, str(src), tmp_path / "one"))
    first.start()
    try:
        wait_for(lambda: fs.downloads_started == 1, "the first download to start")
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(CancelledError, match="cancelled while waiting"):
            cache.fetch(fs, str(src), tmp_path / "two", cancel)
        waiting = Cache(tmp_path / "cache", 10**6, wait_seconds=0.2)
        with pytest.raises(CacheError, match="another slot's download"):
            waiting.fetch(fs, str(src), tmp_path / "three")
    finally:
        fs.go.set()
        first.join(WAIT)
    assert not first.is_alive()
    assert (tmp_path / "one").read_bytes() == b"w" * 1000
    assert cache.downloads == 1


def test_unusable_cache_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CacheError, match="cache_dir"):
        Cache(tmp_path / "file" / "cache", 100)
