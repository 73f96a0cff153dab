"""Datastores: bucket name -> fsspec URL -> filesystem, and file-by-file copies.

A bucket is a name (``data``) mapped to a URL (``file:///srv/data``,
``sftp://user@host:2222/srv/data?key_filename=/k&known_hosts=/kh``,
``s3://bucket/prefix``, ``gs://bucket``); ``data:x/y`` is then the object
``x/y`` under that URL, and a path ending in ``/`` is a directory.

Directories are copied by listing them and copying file by file with
``get_file``/``put_file`` plus ``makedirs``: recursive ``get``/``put`` behave
differently per fsspec backend, the file-by-file loop works on all of them.

An SFTP bucket that logs in with a key downloads through OpenSSH's ``sftp``
(worker/sftp_batch.py): a file of ``BIG_FILE`` bytes or more, and every file
of a directory of ``BULK_FILES`` files or more, the latter over several
connections at once, with the sizes and dates of the listing standing in for
one stat per file. Everything else (small single files, metadata, uploads,
and buckets with a password) goes through paramiko.

One :class:`Datastore` serves one attempt (one thread): the connections it
opens (SFTP) are its own and are closed by :meth:`Datastore.close`, so a
worker never accumulates connections however many attempts it runs.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import fsspec
import paramiko

from protocol.document import RemotePath
from worker.errors import (
    CancelledError,
    DatastoreError,
    MissingExtraError,
    PathError,
    RemoteNotFoundError,
    WorkerError,
)
from worker.sftp_batch import Login, landing, open_empty, temp_beside, usable
from worker.sftp_pool import STREAM_FILE_MAX, SftpPool

FileSystem = Any  # fsspec.AbstractFileSystem; fsspec ships no type hints
Fetch = Callable[[FileSystem, str, Path], int]
"""Copy one remote file to a local path and return its size (``get_file`` or a cache)."""
Batch = Callable[[int], AbstractContextManager[object]]
"""Wraps the fetches of one directory, given its listed bytes (a cache's ``batch``)."""

BIG_FILE = 16 << 20  # bytes: from here one more SSH login costs less than paramiko's pace
BULK_FILES = 32  # files of a directory from which several sftp connections pay off
SFTP_CONNECTIONS = 4  # per bucket and attempt; the URL's connections=N overrides it
STREAM_THREADS = 16  # a directory's small files in flight at once over the SFTP stream
_POOL = "_ecloud_sftp_pool"  # the attribute of an SFTP filesystem holding its SftpPool


@dataclass(frozen=True)
class Location:
    """An opened bucket: the filesystem and the bucket's root path inside it."""

    fs: FileSystem
    root: str
    url: str

    def path(self, relative: str) -> str:
        """The filesystem path of ``relative`` (keeps a trailing ``/``)."""
        return f"{self.root.rstrip('/')}/{relative}" if self.root else relative


class _PinnedHostKeys(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]  # untyped base
    """Accept a server only when its key is in a known_hosts file (no trust on first use)."""

    def __init__(self, known_hosts: str) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        try:
            known = paramiko.HostKeys(self.known_hosts).lookup(hostname)
        except OSError as exc:
            raise paramiko.SSHException(
                f"cannot read known_hosts file {self.known_hosts}: {exc}") from exc
        if known is None or known.get(key.get_name()) != key:
            raise paramiko.SSHException(
                f"host key of {hostname} ({key.get_name()}) is not in {self.known_hosts}: "
                "add the server's public key there (ssh-keyscan, checked out of band)")


def _open_file(url: str, options: Mapping[str, Any]) -> Location:
    root = os.path.abspath(os.path.expanduser(unquote(url[len("file://"):])))
    return Location(fsspec.filesystem("file"), root, url)


def _open_sftp(url: str, options: Mapping[str, Any]) -> Location:
    parts = urlsplit(url)
    if not parts.hostname:
        raise DatastoreError(f"datastore URL {url!r} names no host: use sftp://user@host/path")
    query = dict(parse_qsl(parts.query))
    opts: dict[str, Any] = {**query, **options}
    known_hosts = os.path.expanduser(str(opts.pop("known_hosts", "~/.ssh/known_hosts")))
    use_openssh = _yes_no(url, "openssh", opts.pop("openssh", "yes"))
    connections = _count(url, "connections", opts.pop("connections", SFTP_CONNECTIONS))
    kwargs: dict[str, Any] = {
        "port": parts.port or 22,
        "username": unquote(parts.username) if parts.username else None,
        "look_for_keys": False,
        "allow_agent": False,
        "timeout": _seconds(url, opts.pop("timeout", 30)),
        "host_key_policy": _PinnedHostKeys(known_hosts),
        "skip_instance_cache": True,
    }
    if "key_filename" in opts:
        kwargs["key_filename"] = os.path.expanduser(str(opts.pop("key_filename")))
    # OpenSSH takes over downloads only when it logs in exactly as paramiko would:
    # with the key alone (a password or another paramiko option keeps paramiko)
    login = Login(host=parts.hostname, port=kwargs["port"], user=kwargs["username"],
                  key_filename=os.path.abspath(kwargs["key_filename"]),
                  known_hosts=os.path.abspath(known_hosts), timeout=kwargs["timeout"],
                  where=_public(url)) if "key_filename" in kwargs and not opts else None
    kwargs.update(opts)
    try:
        fs = fsspec.filesystem("sftp", host=parts.hostname, **kwargs)
    except Exception as exc:  # OSError, SSHException, TypeError for an unknown option
        raise DatastoreError(
            f"cannot open datastore {_public(url)}: {exc}; check the host, port, user, "
            "key_filename and known_hosts of the bucket URL") from exc
    if use_openssh and login is not None and usable(login) and shutil.which("sftp"):
        setattr(fs, _POOL, SftpPool(login, connections))
    return Location(fs, unquote(parts.path) or "/", url)


def _yes_no(url: str, name: str, value: Any) -> bool:
    text = str(value).lower()
    if text not in ("yes", "no", "true", "false", "1", "0"):
        raise DatastoreError(f"datastore {_public(url)}: {name}={value!r} is not yes or no")
    return text in ("yes", "true", "1")


def _count(url: str, name: str, value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise DatastoreError(f"datastore {_public(url)}: {name}={value!r} is not a whole "
                             "number of at least 1")
    return n


def sftp_pool(fs: FileSystem) -> SftpPool | None:
    """The OpenSSH downloads of an SFTP bucket, or None (paramiko does them)."""
    pool = getattr(fs, _POOL, None)
    return pool if isinstance(pool, SftpPool) else None


def _seconds(url: str, value: Any) -> float:
    try:
        return float(value)
    except ValueError:
        raise DatastoreError(f"datastore {_public(url)}: timeout={value!r} is not a number of "
                             "seconds") from None


def _object_store(scheme: str, extra: str, module: str) -> Callable[[str, Mapping[str, Any]],
                                                                     Location]:
    def open_store(url: str, options: Mapping[str, Any]) -> Location:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"datastore {_public(url)} needs the {module} package: "
                f"pip install 'ecloud[{extra}]' on the worker")
        parts = urlsplit(url)
        opts = {**dict(parse_qsl(parts.query)), **options}
        try:
            fs = fsspec.filesystem(scheme, **opts)
        except Exception as exc:  # any backend error: credentials, endpoint, options
            raise DatastoreError(f"cannot open datastore {_public(url)}: {exc}") from exc
        return Location(fs, f"{parts.netloc}{parts.path}".rstrip("/"), url)

    return open_store


OPENERS: dict[str, Callable[[str, Mapping[str, Any]], Location]] = {
    "file": _open_file,
    "sftp": _open_sftp,
    "s3": _object_store("s3", "s3", "s3fs"),
    "gs": _object_store("gcs", "gs", "gcsfs"),
}
"""URL scheme -> opener. One entry per kind of datastore."""


def open_url(url: str, options: Mapping[str, Any] | None = None) -> Location:
    """Open the filesystem behind a bucket URL; options are extra backend arguments."""
    scheme = url.partition("://")[0] if "://" in url else ""
    opener = OPENERS.get(scheme)
    if opener is None:
        raise DatastoreError(
            f"datastore URL {_public(url)} has an unsupported scheme {scheme!r}: "
            f"use one of {', '.join(s + '://' for s in OPENERS)}")
    return opener(url, options or {})


MAKEDIRS_TRIES = 3  # each lost race means another worker made a level: few are needed


def _public(url: str) -> str:
    """A URL fit for a message: the query (which may hold options) is dropped."""
    return url.partition("?")[0]


class Datastore:
    """The buckets of one attempt: resolves ``bucket:path`` and owns the connections."""

    def __init__(self, buckets: Mapping[str, str], default_url: str,
                 options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._urls = dict(buckets)
        self._urls["default"] = default_url
        self._options = dict(options or {})
        self._open: dict[str, Location] = {}

    def url(self, bucket: str) -> str:
        """The URL of a bucket; an unknown bucket is an error that says how to add it."""
        try:
            return self._urls[bucket]
        except KeyError:
            raise DatastoreError(
                f"bucket {bucket!r} is not defined on this worker (known: "
                f"{', '.join(sorted(self._urls))}): add it to [datastore.buckets] or "
                f"`boss admin set-bucket {bucket} URL`") from None

    def location(self, bucket: str) -> Location:
        """The opened bucket (opened on first use, then reused by this attempt)."""
        if bucket not in self._open:
            self._open[bucket] = open_url(self.url(bucket), self._options.get(bucket))
        return self._open[bucket]

    def resolve(self, remote: RemotePath) -> tuple[FileSystem, str]:
        """The filesystem and the path inside it for ``bucket:path``."""
        loc = self.location(remote.bucket)
        return loc.fs, loc.path(remote.path)

    def close(self) -> None:
        """Close the connections this datastore opened (SFTP, its sftp processes too)."""
        for loc in self._open.values():
            pool = sftp_pool(loc.fs)
            if pool is not None:
                pool.close()
            client = getattr(loc.fs, "client", None)
            if isinstance(client, paramiko.SSHClient):
                client.close()
        self._open.clear()

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn a backend's exception into a DatastoreError that says what was being done."""
    try:
        yield
    except WorkerError:
        raise
    except FileNotFoundError as exc:
        raise RemoteNotFoundError(f"{what}: not found ({exc})") from exc
    except Exception as exc:  # fsspec backends raise anything: OSError, SSHException, botocore
        raise DatastoreError(f"{what}: {type(exc).__name__}: {exc}") from exc


def check_file(info: Mapping[str, Any], rpath: str) -> None:
    """Refuse a directory where a file is expected, saying how to ask for a directory."""
    if info.get("type") == "directory":
        raise DatastoreError(f"{rpath} is a directory: end the remote path with '/' "
                             "to copy a directory")


@dataclass
class _Listing:
    """The entries of a directory being copied, and the lock its paramiko calls take."""

    infos: Mapping[str, Mapping[str, Any]]
    lock: threading.Lock


_LISTING = "_ecloud_listing"  # the attribute of a filesystem holding the current _Listing


@contextmanager
def _listed(fs: FileSystem, infos: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    setattr(fs, _LISTING, _Listing(infos, threading.Lock()))
    try:
        yield
    finally:
        setattr(fs, _LISTING, None)


def _listing(fs: FileSystem) -> _Listing | None:
    listing = getattr(fs, _LISTING, None)
    return listing if isinstance(listing, _Listing) else None


@contextmanager
def _paramiko_turn(fs: FileSystem) -> Iterator[None]:
    """Serialize paramiko calls while threads copy a directory: an SFTPClient is not
    safe for concurrent requests."""
    listing = _listing(fs)
    if listing is None:
        yield
    else:
        with listing.lock:
            yield


def stat(fs: FileSystem, path: str) -> Mapping[str, Any]:
    """``fs.info(path)``; during a directory copy, the listing's entry for a regular file
    (no round trip)."""
    listing = _listing(fs)
    if listing is not None:
        info = listing.infos.get(path)
        if info is not None and info.get("type") == "file":
            return info
    with _paramiko_turn(fs):
        result: Mapping[str, Any] = fs.info(path)
    return result


def get_file(fs: FileSystem, rpath: str, lpath: Path, *, in_place: bool = False) -> int:
    """Download one file (no cache); returns its size.

    On SFTP the file lands under a temporary name and is renamed into place,
    so ``lpath`` never holds part of it; OpenSSH's sftp carries it when it is
    big or part of a directory copy (see the module's docstring). With
    ``in_place`` it is written at ``lpath`` directly: for a caller whose
    ``lpath`` is itself a temporary name (the cache), one rename less per file.
    """
    if not in_place:
        lpath.parent.mkdir(parents=True, exist_ok=True)
    with translated(f"download of {rpath}"):
        info = stat(fs, rpath)
        check_file(info, rpath)
        ftp = getattr(fs, "ftp", None)
        if isinstance(ftp, paramiko.SFTPClient) and isinstance(info.get("size"), int):
            path = fs._strip_protocol(rpath)
            pool = sftp_pool(fs)
            size = info["size"]
            listed = _listing(fs) is not None
            done = False
            if pool is not None and (listed or size >= BIG_FILE):
                if listed and size < STREAM_FILE_MAX:  # a directory's small file
                    done = pool.stream_download(path, lpath, size, in_place=in_place)
                done = done or pool.download(path, lpath, in_place=in_place)
            if not done:
                with _paramiko_turn(fs):
                    _sftp_get(ftp, path, lpath, size, in_place)
        else:
            fs.get_file(rpath, str(lpath))
    return lpath.stat().st_size


def _sftp_get(ftp: paramiko.SFTPClient, rpath: str, lpath: Path, size: int,
              in_place: bool = False) -> None:
    """Download ``size`` bytes of an SFTP file in three round trips: open, reads, close.

    fsspec's get_file costs seven per file (stat for isdir, stat again in
    paramiko's getfo, open, the pipelined reads, one more read to see EOF,
    close), which is what bounds a directory of small files. The size comes
    from the caller's stat: a file that grows meanwhile is copied up to that
    size, one that shrinks comes out short (the cache checks the size).
    """
    temp = lpath if in_place else temp_beside(lpath)
    with landing(lpath, temp), ftp.open(rpath, "rb") as remote, \
            os.fdopen(open_empty(temp), "wb") as out:
        if size:
            remote.prefetch(size)  # every read request sent at once, as getfo does
        left = size
        while left > 0:
            chunk = remote.read(min(left, 1 << 20))
            if not chunk:
                break
            out.write(chunk)
            left -= len(chunk)


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("cancelled while copying files")


def copy_in(fs: FileSystem, rpath: str, local: Path, *, fetch: Fetch = get_file,
            batch: Batch | None = None, cancel: threading.Event | None = None) -> int:
    """Copy a remote file, or a directory (``rpath`` ending in ``/``), to ``local``.

    A directory of ``BULK_FILES`` files or more from an SFTP bucket with
    OpenSSH is fetched by as many threads as the bucket has sftp connections;
    ``fetch`` must then be safe to call from several threads (``get_file`` and
    the cache are). A directory's fetches run inside ``batch(listed bytes)``
    when given (the cache then reserves room for them together).
    """
    if not rpath.endswith("/"):
        return fetch(fs, rpath, local)
    base = rpath.rstrip("/")
    with translated(f"listing of {rpath}"):
        if not fs.isdir(base):
            raise RemoteNotFoundError(f"directory {rpath} does not exist")
        found: Mapping[str, Mapping[str, Any]] = fs.find(base, detail=True)
    local.mkdir(parents=True, exist_ok=True)
    prefix = fs._strip_protocol(base).rstrip("/") + "/"
    top = local.resolve()
    items: list[tuple[str, Path]] = []
    for remote_file in sorted(found):
        rel = str(remote_file)[len(prefix):] if str(remote_file).startswith(prefix) else ""
        target = (local / rel).resolve()
        if not rel or not target.is_relative_to(top) or target == top:
            raise DatastoreError(f"{rpath}: listed object {remote_file!r} does not lie under "
                                 "the directory; rename it in the datastore")
        items.append((str(remote_file), target))
    listed = sum(int(found[r].get("size") or 0) for r, _ in items)
    pool = sftp_pool(fs)
    with batch(listed) if batch is not None else nullcontext():
        if pool is None or len(items) < BULK_FILES:
            moved = 0
            for remote_file, target in items:
                _check_cancel(cancel)
                moved += fetch(fs, remote_file, target)
            return moved
        with _listed(fs, found):
            return _fetch_all(fs, items, fetch, STREAM_THREADS, cancel)


def _fetch_all(fs: FileSystem, items: list[tuple[str, Path]], fetch: Fetch, threads: int,
               cancel: threading.Event | None) -> int:
    """``fetch`` every item on ``threads`` threads; the first failure (in listing order)
    stops the rest and is raised once every thread is done."""
    stop = threading.Event()

    def one(remote: str, target: Path) -> int:
        if stop.is_set():
            return 0
        try:
            _check_cancel(cancel)
            return fetch(fs, remote, target)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ecloud-stage-in") as ex:
        futures = [ex.submit(one, remote, target) for remote, target in items]
    for f in futures:
        exc = f.exception()
        if exc is not None:
            raise exc
    return sum(f.result() for f in futures)


def local_files(local: Path, guard: Callable[[Path], None]) -> list[tuple[Path, str]]:
    """The regular files under ``local`` with their relative paths; ``guard`` vets each."""
    out: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(local, followlinks=False):
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise PathError(
                    f"{os.path.join(dirpath, name)} is a link to a directory: outputs are "
                    "copied file by file without following directory links; make it a "
                    "real directory")
        for name in sorted(filenames):
            path = Path(dirpath, name)
            guard(path)
            _check_regular(path)
            out.append((path, path.relative_to(local).as_posix()))
    return out


def _check_regular(path: Path) -> None:
    """Refuse what is not a regular file: opening a FIFO to read it would block forever."""
    if not path.is_file():
        raise PathError(f"{path} is not a regular file (a FIFO, socket, device or broken "
                        "link): outputs may only hold regular files and directories")


def upload(fs: FileSystem, local: Path, rpath: str, *, guard: Callable[[Path], None],
           cancel: threading.Event | None = None) -> int:
    """Upload a file, or a directory (``rpath`` ending in ``/``); returns bytes sent."""
    if rpath.endswith("/"):
        items = [(p, rpath + rel) for p, rel in local_files(local, guard)]
        with translated(f"upload to {rpath}"):
            makedirs(fs, rpath.rstrip("/"))
    else:
        guard(local)
        _check_regular(local)
        items = [(local, rpath)]
    moved = 0
    made: set[str] = set()
    for path, target in items:
        _check_cancel(cancel)
        parent = target.rsplit("/", 1)[0] if "/" in target else ""
        with translated(f"upload of {path} to {target}"):
            if parent and parent not in made:
                makedirs(fs, parent)
                made.add(parent)
            fs.put_file(str(path), target)
        moved += path.stat().st_size
    return moved


def makedirs(fs: FileSystem, path: str) -> None:
    """``fs.makedirs(path, exist_ok=True)``, safe against another worker making a level.

    fsspec's SFTP makedirs looks, then makes, each level: a worker that loses
    the race in between gets the server's bare "Failure" for a directory that
    now exists. Each retry starts past the levels made so far.
    """
    for tries_left in range(MAKEDIRS_TRIES - 1, -1, -1):
        try:
            fs.makedirs(path, exist_ok=True)
            return
        except OSError:
            if tries_left == 0:
                raise


def check_publish(fs: FileSystem, final: str) -> None:
    """Refuse a final path that :func:`publish` could not replace (a file over a directory).

    Called for every output before the first one is moved, so that a conflict
    leaves no output of the attempt published.
    """
    if final.endswith("/"):
        return  # a directory output replaces whatever is there
    with translated(f"checking {final}"):
        if fs.isdir(final):
            raise DatastoreError(f"{final} already exists as a directory; "
                                 "remove it or end the output's path with '/'")


def publish(fs: FileSystem, temp: str, final: str) -> None:
    """Move an uploaded temporary file or directory to its final path, replacing it."""
    is_dir = final.endswith("/")
    src, dst = temp.rstrip("/"), final.rstrip("/")
    with translated(f"moving {src} into place at {dst}"):
        if fs.exists(dst):
            if not is_dir:
                check_publish(fs, dst)  # again: it may have appeared since the check
            else:
                # a directory cannot be renamed over a non-empty one: the old
                # output of an earlier attempt of this task goes first
                fs.rm(dst, recursive=True)
        if "recursive" in inspect.signature(fs.mv).parameters:
            fs.mv(src, dst, recursive=is_dir)
        else:  # SFTP's mv is a plain rename and takes no options
            fs.mv(src, dst)


def discard(fs: FileSystem, temp: str) -> None:
    """Remove a temporary upload; best effort (it is named so as to be recognisable)."""
    try:
        if fs.exists(temp.rstrip("/")):
            fs.rm(temp.rstrip("/"), recursive=True)
    except Exception:  # a leftover temp file is harmless; the task's own error matters more
        pass
