"""Datastores against real backends: file:// on disk, sftp:// through a real sshd.

The SFTP bucket logs in with the fixture's normal, unrestricted client key (a
datastore user, not the worker's forward-only key) and pins the server's host
key from a known_hosts file: an unknown or different key is refused.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import paramiko
import pytest

from protocol.document import parse_remote
from tests import sshd as sshd_helper
from tests.sshd import Sshd, ssh_keygen
from worker import datastore
from worker.datastore import Datastore, open_url
from worker.errors import DatastoreError, MissingExtraError, PathError, RemoteNotFoundError

sshd = sshd_helper.sshd  # the fixture; assigned, not imported, so ruff sees no F811

WAIT = 30.0  # seconds; a bound on every wait, never an expectation


def sftp_url(server: Sshd, root: Path, *, known_hosts: Path | None = None) -> str:
    """A bucket URL for ``root`` on the fixture's sshd, with a pinned host key."""
    kh = known_hosts or server.known_hosts_path
    return (f"sftp://{server.user}@{server.host}:{server.port}{root}"
            f"?key_filename={quote(str(server.client_key_path))}&known_hosts={quote(str(kh))}")


@dataclass
class Bucket:
    """A datastore bucket named ``data`` whose objects live in ``root`` on this host."""

    kind: str
    url: str
    root: Path


@pytest.fixture(params=["file", pytest.param("sftp", marks=pytest.mark.sshd)])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    root = tmp_path / "remote"
    root.mkdir()
    if request.param == "file":
        return Bucket("file", f"file://{root}", root)
    server: Sshd = request.getfixturevalue("sshd")
    return Bucket("sftp", sftp_url(server, root), root)


@pytest.fixture
def store(bucket: Bucket) -> Iterator[Datastore]:
    with Datastore({"data": bucket.url}, bucket.url) as s:
        yield s


def make_tree(root: Path) -> dict[str, bytes]:
    """A small directory tree with nested directories and an empty file."""
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": bytes(range(256)) * 40,
        "sub/deeper/c.txt": b"gamma\n",
        "sub/deeper/empty": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_guard(path: Path) -> None:
    """Staging tests that are not about path escapes vet nothing."""


# ---- stage in ------------------------------------------------------------------------------


def test_copy_in_file(bucket: Bucket, store: Datastore, tmp_path: Path) -> None:
    (bucket.root / "in").mkdir()
    (bucket.root / "in" / "clear.txt").write_bytes(b"hello datastore\n")
    fs, rpath = store.resolve(parse_remote("data:in/clear.txt"))
    dest = tmp_path / "local" / "nested" / "clear.txt"
    assert datastore.copy_in(fs, rpath, dest) == len(b"hello datastore\n")
    assert dest.read_bytes() == b"hello datastore\n"


def test_copy_in_directory_recursively(bucket: Bucket, store: Datastore, tmp_path: Path
                                       ) -> None:
    files = make_tree(bucket.root / "tree")
    fs, rpath = store.resolve(parse_remote("data:tree/"))
    assert rpath.endswith("/")
    dest = tmp_path / "local" / "tree"
    moved = datastore.copy_in(fs, rpath, dest)
    assert read_tree(dest) == files
    assert moved == sum(len(d) for d in files.values())


@pytest.mark.sshd
def test_sftp_copy_sends_one_stat_open_and_close_per_file(
        sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round trips bound a directory of small files (benchmarks/staging.py): per file one
    stat, one open, the data's reads (pipelined) and one close; fsspec's get_file alone
    would stat three times and read once more to see the end of the file."""
    root = tmp_path / "remote"
    files = {"d/empty": b"", "d/small": os.urandom(1000),
             "d/chunks": os.urandom(3 * 32768 + 5)}  # four read requests of at most 32 KiB
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:d/"))
        ftp = fs.ftp
        sent: list[int] = []
        reads: list[int] = []  # the offset of each READ request
        real = ftp._async_request

        def counting(fileobj: object, t: int, *args: object) -> object:
            sent.append(t)
            if t == paramiko.sftp.CMD_READ:
                reads.append(int(args[1]))  # type: ignore[call-overload]  # paramiko's int64
            return real(fileobj, t, *args)

        monkeypatch.setattr(ftp, "_async_request", counting)
        files_seen = datastore.copy_in(fs, rpath, tmp_path / "local")
    assert read_tree(tmp_path / "local") == {k[2:]: v for k, v in files.items()}
    assert files_seen == sum(len(v) for v in files.values())
    per_kind = {t: sent.count(t) for t in set(sent)}
    sftp = paramiko.sftp
    assert per_kind.get(sftp.CMD_STAT) == 1 + len(files)  # the directory's, then each file's
    assert per_kind.get(sftp.CMD_OPEN) == len(files)
    # the listing closes its directory handles too
    assert per_kind.get(sftp.CMD_CLOSE) == len(files) + per_kind[sftp.CMD_OPENDIR]
    # the data's reads: 0 + 1 + 4, none at or past a file's end. paramiko's prefetch
    # thread registers each read after sending it; when a reply is handled before the
    # next read is registered, prefetch counts as done and the reader asks again for
    # the rest itself (8 reads, seen under load): a chunk may be asked for twice
    ends = {len(v) for v in files.values() if v}
    assert sorted(set(reads)) == [0, 32768, 65536, 98304]
    assert not ends & set(reads)
    assert 0 + 1 + 4 <= per_kind.get(sftp.CMD_READ, 0) <= 2 * (0 + 1 + 4)


def test_missing_remote_file_is_a_clear_error(store: Datastore, tmp_path: Path) -> None:
    fs, rpath = store.resolve(parse_remote("data:no/such/file.txt"))
    with pytest.raises(RemoteNotFoundError, match=r"no/such/file\.txt"):
        datastore.copy_in(fs, rpath, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_missing_remote_directory_is_a_clear_error(store: Datastore, tmp_path: Path) -> None:
    fs, rpath = store.resolve(parse_remote("data:no-such-dir/"))
    with pytest.raises(RemoteNotFoundError, match="no-such-dir/ does not exist"):
        datastore.copy_in(fs, rpath, tmp_path / "x")


def test_directory_where_a_file_is_expected(bucket: Bucket, store: Datastore,
                                            tmp_path: Path) -> None:
    make_tree(bucket.root / "tree")
    fs, rpath = store.resolve(parse_remote("data:tree"))
    with pytest.raises(DatastoreError, match="is a directory: end the remote path with '/'"):
        datastore.copy_in(fs, rpath, tmp_path / "x")


# ---- stage out -----------------------------------------------------------------------------


def test_upload_and_publish_file(bucket: Bucket, store: Datastore, tmp_path: Path) -> None:
    local = tmp_path / "result.txt"
    local.write_bytes(b"result\n")
    fs, final = store.resolve(parse_remote("data:out/deep/result.txt"))
    temp = final + ".ecloud-part-1"
    assert datastore.upload(fs, local, temp, guard=no_guard) == 7
    assert not (bucket.root / "out/deep/result.txt").exists()  # only the temp name so far
    datastore.publish(fs, temp, final)
    assert (bucket.root / "out/deep/result.txt").read_bytes() == b"result\n"
    assert sorted(p.name for p in (bucket.root / "out/deep").iterdir()) == ["result.txt"]

    # a later attempt's output replaces the earlier one
    local.write_bytes(b"second\n")
    datastore.upload(fs, local, temp, guard=no_guard)
    datastore.publish(fs, temp, final)
    assert (bucket.root / "out/deep/result.txt").read_bytes() == b"second\n"
    assert sorted(p.name for p in (bucket.root / "out/deep").iterdir()) == ["result.txt"]


def test_upload_and_publish_directory(bucket: Bucket, store: Datastore, tmp_path: Path) -> None:
    files = make_tree(tmp_path / "made")
    fs, final = store.resolve(parse_remote("data:results/"))
    temp = final.rstrip("/") + ".ecloud-part-1/"
    moved = datastore.upload(fs, tmp_path / "made", temp, guard=no_guard)
    assert moved == sum(len(d) for d in files.values())
    assert not (bucket.root / "results").exists()
    datastore.publish(fs, temp, final)
    assert read_tree(bucket.root / "results") == files
    assert sorted(p.name for p in bucket.root.iterdir()) == ["results"]

    # republished with fewer files: the old directory is replaced, not merged
    (tmp_path / "made" / "a.txt").unlink()
    datastore.upload(fs, tmp_path / "made", temp, guard=no_guard)
    datastore.publish(fs, temp, final)
    del files["a.txt"]
    assert read_tree(bucket.root / "results") == files
    assert sorted(p.name for p in bucket.root.iterdir()) == ["results"]


def test_publish_file_over_directory_is_refused(bucket: Bucket, store: Datastore,
                                                tmp_path: Path) -> None:
    (bucket.root / "taken").mkdir()
    local = tmp_path / "f"
    local.write_bytes(b"x")
    fs, final = store.resolve(parse_remote("data:taken"))
    datastore.upload(fs, local, final + ".part", guard=no_guard)
    with pytest.raises(DatastoreError, match="already exists as a directory"):
        datastore.publish(fs, final + ".part", final)
    datastore.discard(fs, final + ".part")
    assert sorted(p.name for p in bucket.root.iterdir()) == ["taken"]


def test_upload_refuses_a_directory_symlink(store: Datastore, tmp_path: Path) -> None:
    made = tmp_path / "made"
    made.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (made / "link").symlink_to(tmp_path / "elsewhere")
    fs, final = store.resolve(parse_remote("data:results/"))
    with pytest.raises(PathError, match="link to a directory"):
        datastore.upload(fs, made, final, guard=no_guard)


@pytest.mark.parametrize("kind", ["fifo", "broken-link"])
def test_upload_refuses_what_is_not_a_regular_file(store: Datastore, tmp_path: Path,
                                                   kind: str) -> None:
    made = tmp_path / "made"
    made.mkdir()
    (made / "ok").write_bytes(b"ok")
    if kind == "fifo":
        os.mkfifo(made / "odd")  # reading it would block the upload forever
    else:
        (made / "odd").symlink_to(made / "absent")
    fs, final = store.resolve(parse_remote("data:results/"))
    outcome: list[BaseException | int] = []

    def target() -> None:
        try:
            outcome.append(datastore.upload(fs, made, final, guard=no_guard))
        except BaseException as exc:
            outcome.append(exc)

    # in a thread, so that a regression fails the test instead of hanging it
    uploader = threading.Thread(target=target, daemon=True)
    uploader.start()
    uploader.join(WAIT)
    assert not uploader.is_alive(), "the upload blocked"
    (error,) = outcome
    assert isinstance(error, PathError), error
    assert "is not a regular file" in str(error)
    fs_file, single = store.resolve(parse_remote("data:single"))
    with pytest.raises(PathError, match="is not a regular file"):
        datastore.upload(fs_file, made / "odd", single, guard=no_guard)


def test_discard_removes_a_temporary_directory(bucket: Bucket, store: Datastore,
                                               tmp_path: Path) -> None:
    make_tree(tmp_path / "made")
    fs, final = store.resolve(parse_remote("data:results/"))
    temp = final.rstrip("/") + ".ecloud-part-9/"
    datastore.upload(fs, tmp_path / "made", temp, guard=no_guard)
    datastore.discard(fs, temp)
    assert list(bucket.root.iterdir()) == []
    datastore.discard(fs, temp)  # already gone: no error


# ---- buckets and URLs ----------------------------------------------------------------------


def test_unknown_bucket_says_how_to_add_it(tmp_path: Path) -> None:
    store = Datastore({"data": f"file://{tmp_path}"}, f"file://{tmp_path}")
    with pytest.raises(DatastoreError, match=r"bucket 'nope' is not defined.*set-bucket nope"):
        store.resolve(parse_remote("nope:x"))


def test_unsupported_scheme() -> None:
    with pytest.raises(DatastoreError, match="unsupported scheme 'ftp'"):
        open_url("ftp://host/x")


@pytest.mark.parametrize(("url", "module"), [("s3://bucket/prefix", "s3fs"),
                                             ("gs://bucket", "gcsfs")])
def test_object_store_without_its_extra(url: str, module: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here; this checks the message when it is not")
    with pytest.raises(MissingExtraError, match=rf"needs the {module} package: pip install"):
        open_url(url)


def test_file_url_root_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = open_url("file://rel/data")
    assert loc.root == str(tmp_path / "rel" / "data")
    assert loc.path("x/y") == f"{tmp_path}/rel/data/x/y"


# ---- sftp: host key pinning and connections ------------------------------------------------


@pytest.mark.sshd
def test_sftp_pins_the_host_key(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    (root / "f").write_bytes(b"pinned\n")
    with Datastore({}, sftp_url(sshd, root)) as store:
        fs, rpath = store.resolve(parse_remote("default:f"))
        datastore.copy_in(fs, rpath, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == b"pinned\n"


@pytest.mark.sshd
def test_sftp_refuses_a_different_host_key(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    other = ssh_keygen(tmp_path / "impostor", "impostor").split()
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {other[0]} {other[1]}\n")
    with pytest.raises(DatastoreError, match=r"is not in .*known_hosts_wrong"):
        open_url(sftp_url(sshd, root, known_hosts=wrong))
    assert "Accepted publickey" not in sshd.log  # refused before authenticating


@pytest.mark.sshd
def test_sftp_refuses_a_host_missing_from_known_hosts(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    # the right key, but pinned for another port: it does not vouch for this server
    kh = tmp_path / "known_hosts_other_port"
    key = sshd.host_key_pub.split()
    kh.write_text(f"[{sshd.host}]:{sshd.port + 1} {key[0]} {key[1]}\n")
    with pytest.raises(DatastoreError, match="add the server's public key"):
        open_url(sftp_url(sshd, root, known_hosts=kh))
    missing = tmp_path / "no_such_known_hosts"
    with pytest.raises(DatastoreError, match="cannot read known_hosts"):
        open_url(sftp_url(sshd, root, known_hosts=missing))


@pytest.mark.sshd
def test_sftp_error_message_hides_the_query(sshd: Sshd, tmp_path: Path) -> None:
    url = f"sftp://{sshd.user}@{sshd.host}:{sshd.port}/x?key_filename=/nonexistent/key" \
          f"&known_hosts={quote(str(sshd.known_hosts_path))}"
    with pytest.raises(DatastoreError) as info:
        open_url(url)
    assert "?key_filename=" not in str(info.value)  # options may hold secrets
    assert f"sftp://{sshd.user}@{sshd.host}:{sshd.port}/x" in str(info.value)


@pytest.mark.sshd
def test_sftp_bad_url_options_are_datastore_errors(sshd: Sshd, tmp_path: Path) -> None:
    base = sftp_url(sshd, tmp_path)
    with pytest.raises(DatastoreError, match="unexpected keyword argument 'bogus'"):
        open_url(base + "&bogus=1")
    with pytest.raises(DatastoreError, match="timeout='soon' is not a number"):
        open_url(base + "&timeout=soon")
    with pytest.raises(DatastoreError, match="names no host"):
        open_url("sftp:///just/a/path")


@pytest.mark.sshd
def test_close_ends_the_sftp_connection(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    root.mkdir()
    store = Datastore({}, sftp_url(sshd, root))
    loc = store.location("default")
    client = loc.fs.client
    assert isinstance(client, paramiko.SSHClient)
    transport = client.get_transport()
    assert transport is not None and transport.is_active()
    # a second Datastore opens its own connection (no shared instance cache)
    other = Datastore({}, sftp_url(sshd, root))
    assert other.location("default").fs.client is not client
    store.close()
    other.close()
    assert not transport.is_active()
