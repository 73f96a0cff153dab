"""Benchmark 7: stage-in from an SFTP datastore vs scp, and many small files vs tar over ssh.

    .venv/bin/python benchmarks/run.py staging                     # 512 MiB; 10,000 x 1 KiB; 3 runs
    .venv/bin/python benchmarks/run.py staging --parts big --big-mib 256 --repeat 5
    .venv/bin/python benchmarks/run.py staging -- --openssh no     # paramiko only, as before

A real OpenSSH sshd on 127.0.0.1 (tests/sshd.py, ``Subsystem sftp
internal-sftp``) serves a directory in a temporary directory; the copies land
in another directory on the same filesystem, emptied between runs. The
datastore is ``sftp://USER@127.0.0.1:PORT/DIR?key_filename=K&known_hosts=KH``
(the URL form a worker's bucket takes; fsspec's SFTP filesystem on paramiko),
and ecloud's copy is what an attempt does to stage in an input without a
cache: open the bucket (worker/datastore.py ``Datastore``: a new SSH login per
attempt), ``copy_in`` (``get_file`` per file; a directory input, ``data:small/``,
is listed with ``find`` and copied file by file), close it. Downloads go through
OpenSSH (worker/sftp_pool.py: ``sftp`` for a file of 16 MiB or more, and for
a directory of 32 files or more over up to 4 connections, the directory's files
under 1 MiB over one ``ssh -s sftp`` with 16 in flight) unless ``--openssh no``.
"ecloud+cache" is the same through a fresh (cold) input cache, which is what
an attempt in ``cloud`` storage mode does (``Cache.fetch`` per file, a
directory inside ``Cache.batch``); its ratio is held to the same goals. The
contenders use the same key and sshd, the login included:

- big: one file of ``--big-mib`` MiB (random bytes) vs ``scp`` of it (OpenSSH
  9's scp speaks SFTP to internal-sftp too). Ratio: scp's seconds / ecloud's
  (throughput ratio). Goal >= 0.8 (stretch >= 1.0).
- small: ``--files`` files of ``--file-bytes`` bytes in directories of 100, as
  one directory input, vs ``ssh HOST tar -C SRC -cf - . | tar -C DST -xf -``
  (the pull form of ``tar | ssh tar``, in the direction a stage-in goes).
  Ratio: ecloud's seconds / tar's. Goal <= 2.

Every copy is checked (size and file count; the big file's bytes once).
Each part runs ``--repeat`` times, the contenders interleaved; medians of the
per-run ratios.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

# a script, not a package module: make the repository importable (worker, tests.sshd)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from benchmarks.shell_tasks import BenchError, median_or_none, timed_command  # noqa: E402
from protocol.document import RemotePath  # noqa: E402
from tests.sshd import Sshd, start_sshd  # noqa: E402
from worker.cache import Cache  # noqa: E402
from worker.datastore import Datastore, FileSystem, copy_in  # noqa: E402

NAME = "staging"
TINY_ARGS = ["--big-mib", "8", "--files", "200", "--repeat", "1"]
FULL_ARGS: list[str] = []  # the defaults: 512 MiB, 10,000 x 1 KiB, 3 runs
REPEATS = True

BIG_GOAL, BIG_STRETCH = 0.8, 1.0
SMALL_GOAL = 2.0
PER_DIR = 100  # small files per directory
BOUND = 900.0  # seconds one copy may take: a bound, not an expectation


# --- the data -----------------------------------------------------------------------------

def make_big(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))  # random: nothing along the way can compress it


def make_small(top: Path, files: int, size: int) -> None:
    for i in range(files):
        d = top / f"d{i // PER_DIR:03d}"
        if i % PER_DIR == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(os.urandom(size))


def census(top: Path) -> tuple[int, int]:
    """(regular files, bytes) under top."""
    n = total = 0
    for dirpath, _, names in os.walk(top):
        for name in names:
            n += 1
            total += os.path.getsize(os.path.join(dirpath, name))
    return n, total


# --- the contenders -----------------------------------------------------------------------

def bucket_url(sshd: Sshd, root: Path) -> str:
    return (f"sftp://{sshd.user}@{sshd.host}:{sshd.port}{quote(str(root))}"
            f"?key_filename={quote(str(sshd.client_key_path))}"
            f"&known_hosts={quote(str(sshd.known_hosts_path))}")


def ecloud_stage_in(url: str, remote: str, dest: Path, cache_dir: Path | None = None
                    ) -> float:
    """Seconds to stage ``data:remote`` into ``dest`` as an attempt does; through a new,
    empty cache in ``cache_dir`` if given (else none)."""
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    start = time.perf_counter()
    cache = Cache(cache_dir, 1 << 40) if cache_dir is not None else None

    def fetch(fs: FileSystem, rpath: str, local: Path) -> int:
        assert cache is not None
        return cache.fetch(fs, rpath, local)

    with Datastore({"data": url}, url) as store:
        fs, rpath = store.resolve(RemotePath("data", remote))
        if cache is None:
            copy_in(fs, rpath, dest)
        else:
            copy_in(fs, rpath, dest, fetch=fetch, batch=cache.batch)
    seconds = time.perf_counter() - start
    if cache_dir is not None:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return seconds


def ssh_options(sshd: Sshd) -> list[str]:
    """The same key and pinned host key as the datastore; no user or system ssh config."""
    return ["-F", "/dev/null", "-i", str(sshd.client_key_path), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={sshd.known_hosts_path}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]


def scp_seconds(sshd: Sshd, src: Path, dest: Path) -> float:
    return timed_command(["scp", "-q", *ssh_options(sshd), "-P", str(sshd.port),
                          f"{sshd.user}@{sshd.host}:{src}", str(dest)], BOUND)


def tar_seconds(sshd: Sshd, src: Path, dest: Path) -> float:
    dest.mkdir(parents=True, exist_ok=True)
    remote = shlex.join(["tar", "-C", str(src), "-cf", "-", "."])
    ssh = shlex.join(["ssh", *ssh_options(sshd), "-p", str(sshd.port),
                      f"{sshd.user}@{sshd.host}", remote])
    return timed_command(["bash", "-o", "pipefail", "-c",
                          f"{ssh} | tar -C {shlex.quote(str(dest))} -xf -"], BOUND)


# --- the benchmark ------------------------------------------------------------------------

def measure(big_mib: int, files: int, file_bytes: int, repeat: int, parts: list[str],
            openssh: bool = True) -> Report:
    rows: list[dict[str, Cell]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ecloud-bench-staging-") as tmp:
        root = Path(tmp)
        src, dst = root / "src", root / "dst"
        sshd = start_sshd(root)
        try:
            url = bucket_url(sshd, src) + ("" if openssh else "&openssh=no")
            if "big" in parts:
                make_big(src / "big.bin", big_mib)
                r, n = big_part(sshd, url, src, dst, big_mib, repeat)
                rows += r
                notes += n
            if "small" in parts:
                make_small(src / "small", files, file_bytes)
                r, n = small_part(sshd, url, src, dst, files, file_bytes, repeat)
                rows += r
                notes += n
        finally:
            sshd.stop()
    notes.append("Both sides on one filesystem under /tmp, the source in the page cache; "
                 "each time includes the SSH login (ecloud opens its bucket per attempt). "
                 "ecloud downloads through " + ("OpenSSH's sftp (worker/sftp_batch.py) where "
                 "it pays off" if openssh else "paramiko only (--openssh no)") + ".")
    columns = ["part", "contender", "how", "runs", "median s", "min s", "max s", "MB/s",
               "files/s", "ratio"]
    used = [c for c in columns if any(c in r for r in rows)]
    return Report(title=f"staging: SFTP datastore stage-in vs scp and tar over ssh, "
                        f"{repeat} run(s) each", columns=used, rows=rows, notes=notes)


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def timed_rounds(part: str, copies: dict[str, Callable[[Path], float]], target: Callable[[], Path],
                 check: Callable[[str, Path, int], None], rate: Callable[[float], str],
                 repeat: int, dst: Path) -> dict[str, list[float]]:
    """Each contender's copy, interleaved, ``repeat`` times; its seconds, in round order
    (so that a ratio can be taken per round). ``check(name, copy, round)`` raises on a
    wrong copy."""
    runs: dict[str, list[float]] = {name: [] for name in copies}
    for i in range(repeat):
        for name, copy in copies.items():
            out = target()
            seconds = copy(out)
            check(name, out, i)
            runs[name].append(seconds)
            print(f"staging: {part} run {i + 1}/{repeat} {name}: {seconds:.2f} s "
                  f"({rate(seconds)}) load {load()}", file=sys.stderr, flush=True)
    shutil.rmtree(dst, ignore_errors=True)
    return runs


def big_part(sshd: Sshd, url: str, src: Path, dst: Path, mib: int, repeat: int
             ) -> tuple[list[dict[str, Cell]], list[str]]:
    size = mib << 20
    copies: dict[str, Callable[[Path], float]] = {
        "ecloud": lambda d: ecloud_stage_in(url, "big.bin", d),
        "ecloud+cache": lambda d: ecloud_stage_in(url, "big.bin", d, dst.parent / "cache"),
        "scp": lambda d: scp_seconds(sshd, src / "big.bin", d),
    }

    def check(name: str, out: Path, round_no: int) -> None:
        # the bytes themselves are compared in the first round only
        if out.stat().st_size != size or (round_no == 0 and not filecmp.cmp(
                src / "big.bin", out, shallow=False)):
            raise BenchError(f"staging: {name} copied {out.stat().st_size} bytes of "
                             f"{size}, or other bytes")

    runs = timed_rounds("big", copies, lambda: fresh(dst) / "big.bin", check,
                        lambda t: f"{size / t / 1e6:,.0f} MB/s", repeat, dst)
    ratios = [scp / ecloud for scp, ecloud in zip(runs["scp"], runs["ecloud"], strict=True)]
    ratio = median_or_none(ratios)
    cached = median_or_none([scp / ec for scp, ec in zip(runs["scp"], runs["ecloud+cache"],
                                                         strict=True)])
    rows: list[dict[str, Cell]] = []
    for name, how, r in (("ecloud", "Datastore + copy_in (get_file)", ratio),
                         ("ecloud+cache", "the same through a cold input cache", cached),
                         ("scp", "scp -P PORT USER@127.0.0.1:SRC DST", None)):
        xs = runs[name]
        med = statistics.median(xs)
        rows.append({"part": f"big: 1 x {mib} MiB", "contender": name, "how": how,
                     "runs": len(xs), "median s": med, "min s": min(xs), "max s": max(xs),
                     "MB/s": round(size / med / 1e6), "ratio": r})
    assert ratio is not None and cached is not None
    notes = [f"big: ecloud's throughput is {ratio:.2f}x scp's (scp s / ecloud s per run, "
             f"median of {len(ratios)}: {', '.join(f'{r:.2f}' for r in ratios)}); goal >= "
             f"{BIG_GOAL}x: {big_verdict(ratio)} (stretch {BIG_STRETCH}x); through a cold "
             f"input cache (what an attempt in cloud mode does) {cached:.2f}x: "
             f"{big_verdict(cached)}"]
    return rows, notes


def small_part(sshd: Sshd, url: str, src: Path, dst: Path, files: int, file_bytes: int,
               repeat: int) -> tuple[list[dict[str, Cell]], list[str]]:
    copies: dict[str, Callable[[Path], float]] = {
        "ecloud": lambda d: ecloud_stage_in(url, "small/", d),
        "ecloud+cache": lambda d: ecloud_stage_in(url, "small/", d, dst.parent / "cache"),
        "tar": lambda d: tar_seconds(sshd, src / "small", d),
    }

    def check(name: str, out: Path, _round: int) -> None:
        if census(out) != (files, files * file_bytes):
            raise BenchError(f"staging: {name} copied {census(out)} (files, bytes) of "
                             f"{(files, files * file_bytes)}")

    runs = timed_rounds("small", copies, lambda: fresh(dst) / "small", check,
                        lambda t: f"{files / t:,.0f} files/s", repeat, dst)
    ratios = [ecloud / tar for ecloud, tar in zip(runs["ecloud"], runs["tar"], strict=True)]
    ratio = median_or_none(ratios)
    cached = median_or_none([ec / tar for ec, tar in zip(runs["ecloud+cache"], runs["tar"],
                                                         strict=True)])
    rows: list[dict[str, Cell]] = []
    for name, how, r in (("ecloud", "directory input data:small/ (find + get_file per file)",
                          ratio),
                         ("ecloud+cache", "the same through a cold input cache", cached),
                         ("tar", "ssh HOST tar -C SRC -cf - . | tar -C DST -xf -", None)):
        xs = runs[name]
        med = statistics.median(xs)
        rows.append({"part": f"small: {files:,} x {file_bytes:,} B", "contender": name,
                     "how": how, "runs": len(xs), "median s": med, "min s": min(xs),
                     "max s": max(xs), "files/s": round(files / med), "ratio": r})
    assert ratio is not None and cached is not None
    notes = [f"small: ecloud takes {ratio:.2f}x tar's time (ecloud s / tar s per run, median "
             f"of {len(ratios)}: {', '.join(f'{r:.2f}' for r in ratios)}); goal <= "
             f"{SMALL_GOAL:.0f}x: {small_verdict(ratio)}; through a cold input cache (what an "
             f"attempt in cloud mode does) {cached:.2f}x: {small_verdict(cached)}"]
    return rows, notes


def big_verdict(ratio: float) -> str:
    return ("met" if ratio >= BIG_GOAL else f"NOT met (short by {BIG_GOAL - ratio:.2f})") + (
        "; stretch met" if ratio >= BIG_STRETCH else "")


def small_verdict(ratio: float) -> str:
    return "met" if ratio <= SMALL_GOAL else f"NOT met ({ratio / SMALL_GOAL:.2f}x over it)"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="staging", description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mib", type=int, default=512, help="the big file, MiB (default 512)")
    ap.add_argument("--files", type=int, default=10_000, help="small files (default 10,000)")
    ap.add_argument("--file-bytes", type=int, default=1024, help="each small file's size "
                    "(default 1 KiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--parts", nargs="+", choices=("big", "small"), default=["big", "small"])
    ap.add_argument("--openssh", choices=("yes", "no"), default="yes",
                    help="download through OpenSSH's sftp where it pays off (default), or "
                    "through paramiko only (the bucket URL's openssh=no)")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if min(args.big_mib, args.files, args.file_bytes, args.repeat) < 1:
        raise SystemExit("staging: --big-mib, --files, --file-bytes and --repeat must be >= 1")
    for tool in ("scp", "ssh", "tar", "bash"):
        if shutil.which(tool) is None:
            raise SystemExit(f"staging: {tool} is not installed (apt-get install "
                             "openssh-client tar bash)")
    return measure(args.big_mib, args.files, args.file_bytes, args.repeat, args.parts,
                   args.openssh == "yes")


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
