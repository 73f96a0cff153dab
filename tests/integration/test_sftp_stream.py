"""A directory's small files over one ``ssh -s sftp`` (worker/sftp_pool.py SftpStream).

Against a real sshd: the bytes of empty, small and multi-read files, files big
enough for an sftp process beside them, a file missing on the server, the
server gone in the middle of a directory, and no ssh process or partial file
left behind.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from protocol.document import parse_remote
from tests import sshd as sshd_helper
from tests.integration.test_datastore_openssh import sftp_processes
from tests.sshd import Sshd
from worker import datastore
from worker.datastore import Datastore, copy_in, sftp_pool
from worker.errors import DatastoreError
from worker.sftp_batch import Login, SftpError
from worker.sftp_pool import READ_BYTES, SftpStream

sshd = sshd_helper.sshd  # the fixture

pytestmark = pytest.mark.sshd

WAIT = 30.0  # seconds; a bound on every wait, never an expectation


def url_of(server: Sshd, root: Path) -> str:
    return (f"sftp://{server.user}@{server.host}:{server.port}{root}"
            f"?key_filename={quote(str(server.client_key_path))}"
            f"&known_hosts={quote(str(server.known_hosts_path))}")


def login_of(server: Sshd) -> Login:
    return Login(host=server.host, port=server.port, user=server.user,
                 key_filename=str(server.client_key_path),
                 known_hosts=str(server.known_hosts_path), timeout=10.0, where="the test sshd")


def partials(top: Path) -> list[str]:
    return [p.name for p in top.rglob("*") if ".ecloud-part-" in p.name]


def test_sizes_and_a_missing_file(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    sizes = {"empty": 0, "one": 1, "exact": READ_BYTES,
             "several": 3 * READ_BYTES + 17}
    for name, size in sizes.items():
        (root / name).write_bytes(os.urandom(size))
    stream = SftpStream(login_of(sshd))
    try:
        for name, size in sizes.items():
            stream.download(str(root / name), tmp_path / name, size)
            assert (tmp_path / name).read_bytes() == (root / name).read_bytes()
        # the listing's size is what is read: a file that grew since is cut there, one
        # that shrank comes out short (the cache compares the size)
        stream.download(str(root / "several"), tmp_path / "cut", 10)
        assert (tmp_path / "cut").read_bytes() == (root / "several").read_bytes()[:10]
        stream.download(str(root / "one"), tmp_path / "short", 5)
        assert (tmp_path / "short").read_bytes() == (root / "one").read_bytes()
        with pytest.raises(FileNotFoundError, match="absent"):
            stream.download(str(root / "absent"), tmp_path / "absent", 3)
        stream.download(str(root / "one"), tmp_path / "after", 1)  # still usable
        assert (tmp_path / "after").read_bytes() == (root / "one").read_bytes()
    finally:
        stream.close()
    assert sftp_processes() == []


def test_small_files_by_stream_big_ones_by_sftp(sshd: Sshd, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datastore, "STREAM_FILE_MAX", 4096)
    root = tmp_path / "remote"
    files = {f"d{i % 3}/f{i:03d}": os.urandom(i * 197) for i in range(datastore.BULK_FILES + 10)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    dest = tmp_path / "local"
    with Datastore({}, url_of(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:./"))
        pool = sftp_pool(fs)
        assert pool is not None
        moved = copy_in(fs, rpath, dest)
        assert pool.processes() >= 2  # the stream's ssh and at least one sftp
    assert moved == sum(len(d) for d in files.values())
    assert {p.relative_to(dest).as_posix(): p.read_bytes()
            for p in dest.rglob("*") if p.is_file()} == files
    assert partials(tmp_path) == []
    assert sftp_processes() == []


def test_the_server_gone_in_the_middle_of_a_directory(tmp_path: Path) -> None:
    server = sshd_helper.start_sshd(tmp_path / "server")
    root = tmp_path / "remote"
    for i in range(3000):
        (root / f"d{i // 100:02d}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 100:02d}" / f"f{i:04d}").write_bytes(b"x" * 512)
    dest = tmp_path / "local"
    stopped = threading.Event()

    def stop_when_files_arrive() -> None:
        while not stopped.is_set():
            if dest.exists() and any(dest.rglob("f*")):
                server.stop()
                stopped.set()
                return
            stopped.wait(0.001)

    errors: list[BaseException] = []

    def copy() -> None:
        try:
            with Datastore({}, url_of(server, root)) as store:
                fs, rpath = store.resolve(parse_remote("default:./"))
                copy_in(fs, rpath, dest)
        except BaseException as exc:
            errors.append(exc)

    killer = threading.Thread(target=stop_when_files_arrive)
    copier = threading.Thread(target=copy)
    killer.start()
    copier.start()
    try:
        copier.join(WAIT)
        assert not copier.is_alive(), "the copy hung after the server went away"
    finally:
        stopped.set()
        killer.join(WAIT)
        server.stop()
    assert len(errors) == 1 and isinstance(errors[0], DatastoreError), errors
    print(f"\n  server gone: {errors[0]}")
    assert str(root) in str(errors[0])  # names the file, and the store
    assert "key_filename" not in str(errors[0])
    assert partials(dest) == []
    assert sftp_processes() == []


def test_a_stream_that_cannot_log_in(sshd: Sshd, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("")  # nothing pinned: ssh must refuse the server
    login = Login(host=sshd.host, port=sshd.port, user=sshd.user,
                  key_filename=str(sshd.client_key_path), known_hosts=str(kh), timeout=10.0,
                  where="the test sshd")
    with pytest.raises(SftpError, match="Host key verification failed"):
        SftpStream(login)
    assert kh.read_text() == ""
    assert sftp_processes() == []


def test_a_big_file_through_the_cache_over_sftp(sshd: Sshd, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """sftp writes into the cache's reservation file without truncating it (``reget``
    from 0): the bytes, the entry and the bound come out exact."""
    from worker.cache import Cache

    monkeypatch.setattr(datastore, "BIG_FILE", 1 << 20)
    root = tmp_path / "remote"
    root.mkdir()
    data = os.urandom(3 << 20)
    (root / "big.bin").write_bytes(data)
    cache = Cache(tmp_path / "cache", 1 << 30)
    for attempt in (1, 2):
        with Datastore({}, url_of(sshd, root)) as store:
            fs, rpath = store.resolve(parse_remote("default:big.bin"))
            assert copy_in(fs, rpath, tmp_path / f"work{attempt}", fetch=cache.fetch) == len(data)
        assert (tmp_path / f"work{attempt}").read_bytes() == data
    assert (cache.downloads, cache.hits) == (1, 1)
    assert [e.size for e in cache.entries()] == [len(data)]
    assert cache.usage() == len(data)
    assert sorted(p.name for p in (cache.root / "tmp").iterdir()) == []
    assert sftp_processes() == []
