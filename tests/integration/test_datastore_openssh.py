"""SFTP downloads through OpenSSH's sftp (worker/sftp_batch.py) against a real sshd.

A big file, and every file of a big enough directory, goes through ``sftp -b -``
processes logged in with the bucket's key and its pinned known_hosts; the rest
through paramiko. These tests check what must hold either way: the bytes,
odd file names, the cache, the host key (never trusted on first use), a
datastore killed mid-transfer, a full local disk, and that no partial file and
no sftp process is left behind.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from protocol.document import parse_remote
from tests import sshd as sshd_helper
from tests.sshd import Sshd, _descendants, ssh_keygen
from worker import datastore
from worker.cache import Cache
from worker.datastore import Datastore, sftp_pool
from worker.errors import DatastoreError

sshd = sshd_helper.sshd  # the fixture

pytestmark = pytest.mark.sshd

WAIT = 30.0  # seconds; a bound on every wait, never an expectation
ODD_NAMES = ["sp ace", 'quo"te', "star*", "br[a]ck", "back\\slash", "#hash", "-dash",
             "ünïcode", "semi;colon", "dollar$HOME", "tab\tin"]


def sftp_url(server: Sshd, root: Path, *, extra: str = "") -> str:
    return (f"sftp://{server.user}@{server.host}:{server.port}{root}"
            f"?key_filename={quote(str(server.client_key_path))}"
            f"&known_hosts={quote(str(server.known_hosts_path))}{extra}")


def sftp_processes() -> list[int]:
    """This test process's sftp children (the sshd's are not sftp)."""
    found = []
    for pid in _descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() in ("sftp", "ssh"):
                found.append(pid)
        except OSError:
            continue  # exited meanwhile
    return found


def leftovers(top: Path) -> list[str]:
    return [p.name for p in top.rglob("*") if ".ecloud-part-" in p.name]


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Make the remote files (relative path -> contents) under ``root``."""
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


@pytest.fixture
def small_big_file(monkeypatch: pytest.MonkeyPatch) -> int:
    """Make 1 MiB "big" so that a test file of a few MiB takes the OpenSSH path."""
    monkeypatch.setattr(datastore, "BIG_FILE", 1 << 20)
    return 1 << 20


def test_a_big_file_comes_through_openssh(sshd: Sshd, tmp_path: Path,
                                          small_big_file: int) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    data = os.urandom(3 * small_big_file + 7)
    (root / "big.bin").write_bytes(data)
    dest = tmp_path / "local" / "big.bin"
    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:big.bin"))
        pool = sftp_pool(fs)
        assert pool is not None
        assert datastore.copy_in(fs, rpath, dest) == len(data)
        assert pool.processes() == 1  # one sftp did it, and waits for the next file
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == []
    # paramiko's login and sftp's: two sessions with the one key
    assert sshd.log.count("Accepted publickey") == 2
    assert sftp_processes() == []  # closing the datastore ended the sftp process


def test_a_directory_comes_through_several_sftp_connections(sshd: Sshd,
                                                           tmp_path: Path) -> None:
    root = tmp_path / "remote"
    files: dict[str, bytes] = {}
    for i in range(datastore.BULK_FILES + 8):
        files[f"d{i % 3}/sub{i % 2}/f{i:03d}"] = os.urandom(i * 37)  # f000 is empty
    for name in ODD_NAMES:
        files[f"odd/{name}"] = name.encode() * 3
    write_tree(root, files)
    dest = tmp_path / "local"
    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:./"))
        pool = sftp_pool(fs)
        assert pool is not None
        moved = datastore.copy_in(fs, rpath, dest)
        assert 1 <= pool.processes() <= datastore.SFTP_CONNECTIONS
    got = {p.relative_to(dest).as_posix(): p.read_bytes()
           for p in dest.rglob("*") if p.is_file()}
    assert got == files
    assert moved == sum(len(d) for d in files.values())
    assert sftp_processes() == []


def test_a_directory_through_the_cache(sshd: Sshd, tmp_path: Path) -> None:
    """The cache keys each file on the listing's size and mtime (no stat per file) and
    gets its entries from the sftp downloads; a second copy is all hits."""
    root = tmp_path / "remote"
    files = {f"t/f{i:03d}": os.urandom(100 + i) for i in range(datastore.BULK_FILES + 1)}
    write_tree(root, files)
    cache = Cache(tmp_path / "cache", 10 << 20)

    def fetch(fs: datastore.FileSystem, rpath: str, local: Path) -> int:
        return cache.fetch(fs, rpath, local)

    for attempt in (1, 2):
        dest = tmp_path / f"local{attempt}"
        with Datastore({}, sftp_url(sshd, root)) as store:
            fs, rpath = store.resolve(parse_remote("default:t/"))
            datastore.copy_in(fs, rpath, dest, fetch=fetch)
        assert {f"t/{p.name}": p.read_bytes() for p in dest.iterdir()} == files
    assert (cache.downloads, cache.hits) == (len(files), len(files))
    # one of those files as a single input: the listing's key is the stat's key
    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:t/f007"))
        datastore.copy_in(fs, rpath, tmp_path / "single", fetch=fetch)
    assert cache.hits == len(files) + 1 and cache.downloads == len(files)
    assert len(cache.entries()) == len(files)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("pinned", ["another key", "nothing"])
def test_openssh_checks_the_pinned_host_key(sshd: Sshd, tmp_path: Path, small_big_file: int,
                                            pinned: str) -> None:
    """paramiko logged in; then the pin changes: sftp must refuse the server, and must not
    add its key to an empty known_hosts (no trust on first use)."""
    root = tmp_path / "remote"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(2 * small_big_file))
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_path.read_text())
    url = (f"sftp://{sshd.user}@{sshd.host}:{sshd.port}{root}"
           f"?key_filename={quote(str(sshd.client_key_path))}&known_hosts={quote(str(kh))}")
    dest = tmp_path / "local" / "big.bin"
    with Datastore({}, url) as store:
        fs, rpath = store.resolve(parse_remote("default:big.bin"))
        if pinned == "nothing":
            kh.write_text("")
        else:
            other = ssh_keygen(tmp_path / "impostor", "impostor").split()
            kh.write_text(f"[{sshd.host}]:{sshd.port} {other[0]} {other[1]}\n")
        before = kh.read_text()
        with pytest.raises(DatastoreError) as info:
            datastore.copy_in(fs, rpath, dest)
    message = str(info.value)
    print(f"\n  {pinned} pinned: {message}")
    assert "Host key verification failed" in message or "host key" in message.lower()
    assert f"{root}/big.bin" in message and f"sftp://{sshd.user}@" in message
    assert "key_filename" not in message  # the URL's query stays out of messages
    assert kh.read_text() == before
    assert not dest.exists() and leftovers(dest.parent) == []
    assert sftp_processes() == []


def test_datastore_killed_mid_download(sshd: Sshd, tmp_path: Path, small_big_file: int
                                       ) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    size = 96 << 20
    with (root / "big.bin").open("wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    local = tmp_path / "local"
    local.mkdir()
    killed = threading.Event()

    def kill_once_bytes_arrive() -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            parts = [p for p in local.iterdir() if ".ecloud-part-" in p.name]
            if parts and parts[0].stat().st_size > 0:
                sshd.stop()
                killed.set()
                return
            time.sleep(0.001)

    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:big.bin"))
        killer = threading.Thread(target=kill_once_bytes_arrive)
        killer.start()
        try:
            with pytest.raises(DatastoreError) as info:
                datastore.copy_in(fs, rpath, local / "big.bin")
        finally:
            killer.join(WAIT)
    print(f"\n  killed mid-transfer: {info.value}")
    assert killed.is_set()
    assert f"{root}/big.bin" in str(info.value)
    assert list(local.iterdir()) == []  # neither the target nor a temporary
    assert sftp_processes() == []


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True,
                       timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_local_disk_full_during_an_openssh_download(sshd: Sshd, tmp_path: Path,
                                                    small_big_file: int) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(3 * small_big_file))
    with tmpfs(tmp_path / "full", "1m") as local:
        with Datastore({}, sftp_url(sshd, root)) as store:
            fs, rpath = store.resolve(parse_remote("default:big.bin"))
            with pytest.raises(DatastoreError) as info:
                datastore.copy_in(fs, rpath, local / "big.bin")
        print(f"\n  disk full: {info.value}")
        assert "No space left on device" in str(info.value)
        assert f"{root}/big.bin" in str(info.value)
        assert list(local.iterdir()) == []
    assert sftp_processes() == []


def test_when_openssh_is_not_used(sshd: Sshd, tmp_path: Path, small_big_file: int) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    data = os.urandom(2 * small_big_file)
    (root / "big.bin").write_bytes(data)
    # openssh=no, or an option only paramiko knows: paramiko downloads, and still well
    for extra in ("&openssh=no", "&banner_timeout=20"):
        with Datastore({}, sftp_url(sshd, root, extra=extra)) as store:
            fs, rpath = store.resolve(parse_remote("default:big.bin"))
            assert sftp_pool(fs) is None, extra
            dest = tmp_path / f"got{extra[1:5]}"
            assert datastore.copy_in(fs, rpath, dest) == len(data)
            assert dest.read_bytes() == data
    assert sshd.log.count("Accepted publickey") == 2  # no sftp login at all
    for extra, why in (("&openssh=maybe", "openssh='maybe' is not yes or no"),
                       ("&connections=0", "connections='0' is not a whole number")):
        with pytest.raises(DatastoreError, match=why):
            datastore.open_url(sftp_url(sshd, root, extra=extra))


def test_a_server_refusing_extra_logins_leaves_fewer_connections(tmp_path: Path) -> None:
    """sshd's MaxStartups 1 drops a login while another is unauthenticated: the
    directory still comes in whole, over the connections the server took."""
    server = sshd_helper.start_sshd(tmp_path / "strict", extra_config="MaxStartups 1\n")
    try:
        root = tmp_path / "remote"
        files = {f"f{i:03d}": os.urandom(64) for i in range(4 * datastore.BULK_FILES)}
        write_tree(root, files)
        dest = tmp_path / "local"
        with Datastore({}, sftp_url(server, root)) as store:
            fs, rpath = store.resolve(parse_remote("default:./"))
            pool = sftp_pool(fs)
            assert pool is not None
            datastore.copy_in(fs, rpath, dest)
            dropped = "MaxStartups" in server.log or "drop connection" in server.log
            print(f"\n  logins dropped by sshd: {dropped}; sftp processes kept: "
                  f"{pool.processes()} of {datastore.SFTP_CONNECTIONS}")
            if dropped:
                assert pool.processes() < datastore.SFTP_CONNECTIONS
        assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    finally:
        server.stop()
    assert sftp_processes() == []
