"""Benchmark 2: benchmark 1's N `true` tasks with W slots, the worker reaching the boss by SSH.

    .venv/bin/python benchmarks/run.py ssh_tunnels                 # 10,000 tasks, W = 2 and 8
    .venv/bin/python benchmarks/run.py ssh_tunnels --tasks 2000 --slots 8 --repeat 5

The same run as shell_tasks (benchmarks/shell_tasks.py ``time_ecloud``: a
fresh SQLite boss holding N tasks ``true``, ``boss serve``, one ``worker run
--burst`` with W slots, timed from starting the worker to its exit), twice per
round and W, interleaved so that the machine's noise falls on both alike:

- direct: the worker reaches ``boss serve`` at ``tcp://127.0.0.1:PORT``;
- tunnel: the worker reaches it at ``ssh://USER@127.0.0.1:SSHPORT?port=PORT``,
  the production transport (worker/transport.py SshTunnelTransport: one
  OpenSSH ``ssh -W`` process, worker/ssh_tunnel.py), through a real OpenSSH sshd on
  127.0.0.1 (tests/sshd.py). The worker's key is a fresh ed25519 pair
  (boss.keys.generate_worker_keypair) and authorized_keys holds only its
  restricted line (boss.keys.authorized_keys_line: restrict, port-forwarding,
  permitopen to the boss's port, command=/bin/false), with the Match block
  that production adds for a root login (boss.keys.sshd_config_match_block),
  exactly as ``boss`` installs them.
- ``parallel -jW true ::: ...`` for reference.

Reports tunnel throughput over direct throughput: the median of the per-round
ratios (direct seconds / tunnel seconds). Goal: >= 0.9.
"""

from __future__ import annotations

import argparse
import getpass
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# a script, not a package module: make the repository importable (boss, tests.sshd)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Cell, Report, print_report  # noqa: E402
from benchmarks.shell_tasks import (  # noqa: E402
    BenchError,
    Unavailable,
    cpu_of,
    median_or_none,
    time_ecloud,
    time_parallel,
)
from boss.keys import (  # noqa: E402
    authorized_keys_line,
    generate_worker_keypair,
    sshd_config_match_block,
)
from tests.sshd import Sshd, start_sshd  # noqa: E402

NAME = "ssh_tunnels"
TINY_ARGS = ["--tasks", "30", "--slots", "2", "--repeat", "1"]
FULL_ARGS: list[str] = []  # the defaults: 10,000 tasks, W = 2 and 8, 3 rounds
REPEATS = True

GOAL_RATIO = 0.9
RUNNERS = ("direct", "tunnel", "parallel")


def tunnel_reach(sshd: Sshd, keys: Path) -> Callable[[int], list[str]]:
    """The worker arguments for an ssh:// boss on RPC port PORT, with its restricted key.

    authorized_keys is rewritten for each boss (its port is in the line); sshd
    re-reads it at every login, and holds nothing but the worker's line.
    """
    private, public = generate_worker_keypair(keys)

    def reach(port: int) -> list[str]:
        sshd.set_authorized_keys([authorized_keys_line(public, port)])
        return ["--boss", f"ssh://{sshd.user}@{sshd.host}:{sshd.port}?port={port}",
                "--key", str(private), "--known-hosts", str(sshd.known_hosts_path)]

    return reach


def children_cpu() -> float:
    """CPU seconds of this process's reaped children: boss serve, the worker, its tasks."""
    t = os.times()
    return t.children_user + t.children_system


def sshd_cpu(sshd: Sshd) -> float:
    """CPU seconds of sshd and its reaped per-connection processes (the tunnels' cost)."""
    return cpu_of(sshd.process.pid, reaped=True)


def logins(sshd: Sshd) -> int:
    """Public-key logins sshd accepted so far (one per worker run, unless it reconnected)."""
    return sshd.log.count("Accepted publickey")


def measure(tasks: int, slots_list: list[int], repeat: int, runners: list[str]) -> Report:
    seconds: dict[tuple[int, str], list[float]] = {(w, r): [] for w in slots_list for r in runners}
    cpu: dict[tuple[int, str], list[float]] = {(w, r): [] for w in slots_list for r in runners}
    ssh_cpu: dict[int, list[float]] = {w: [] for w in slots_list}
    ratios: dict[int, list[float]] = {w: [] for w in slots_list}
    failed: dict[tuple[int, str], str] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ecloud-bench-ssh-") as tmp, \
            start_sshd(Path(tmp), extra_config=sshd_config_match_block(getpass.getuser())
                       ) as sshd:
        reach = tunnel_reach(sshd, Path(tmp) / "keys")
        contenders: dict[str, Callable[[int, int], float]] = {
            "direct": lambda n, w: time_ecloud(n, w).seconds,
            "tunnel": lambda n, w: time_ecloud(n, w, reach=reach).seconds,
            "parallel": time_parallel,
        }
        for rnd in range(repeat):
            for w in slots_list:
                got: dict[str, float] = {}
                for name in runners:
                    if name in missing or (w, name) in failed:
                        continue
                    before, before_sshd = children_cpu(), sshd_cpu(sshd)
                    try:
                        s = contenders[name](tasks, w)
                    except Unavailable as exc:
                        missing[name] = str(exc)
                        continue
                    except BenchError as exc:
                        failed[(w, name)] = str(exc)
                        print(f"ssh_tunnels: W={w} {name}: FAILED: {exc}", file=sys.stderr)
                        continue
                    got[name] = s
                    seconds[(w, name)].append(s)
                    cpu[(w, name)].append(children_cpu() - before)
                    if name == "tunnel":
                        ssh_cpu[w].append(sshd_cpu(sshd) - before_sshd)
                    print(f"ssh_tunnels: round {rnd + 1}/{repeat} W={w} {name}: {s:.2f} s "
                          f"({tasks / s:,.0f} tasks/s)", file=sys.stderr, flush=True)
                if "direct" in got and "tunnel" in got:
                    ratios[w].append(got["direct"] / got["tunnel"])
        tunnel_runs = sum(len(seconds.get((w, "tunnel"), [])) for w in slots_list)
        accepted = logins(sshd)
    return report(tasks, slots_list, repeat, runners, seconds, ratios, failed, missing,
                  tunnel_runs, accepted, cpu, ssh_cpu)


def report(tasks: int, slots_list: list[int], repeat: int, runners: list[str],
           seconds: dict[tuple[int, str], list[float]], ratios: dict[int, list[float]],
           failed: dict[tuple[int, str], str], missing: dict[str, str], tunnel_runs: int,
           accepted: int, cpu: dict[tuple[int, str], list[float]],
           ssh_cpu: dict[int, list[float]]) -> Report:
    rows: list[dict[str, Cell]] = []
    notes: list[str] = []
    for w in slots_list:
        ratio = median_or_none(ratios[w])
        for name in runners:
            xs = seconds[(w, name)]
            how = {"direct": f"worker --boss tcp://127.0.0.1:PORT, {w} slots",
                   "tunnel": f"worker --boss ssh://...?port=PORT (restricted key), {w} slots",
                   "parallel": f"parallel -j{w} true ::: ..."}[name]
            row: dict[str, Cell] = {"W": w, "contender": name, "how": how, "runs": len(xs)}
            if xs:
                med = statistics.median(xs)
                row.update({"median s": med, "min s": min(xs), "max s": max(xs),
                            "tasks/s": round(tasks / med)})
                row["cpu s"] = median_or_none(cpu[(w, name)])
                if name == "tunnel":
                    row["vs direct"] = ratio
                    row["sshd cpu s"] = median_or_none(ssh_cpu[w])
            else:
                row["status"] = (f"not available: {missing[name]}" if name in missing
                                 else f"failed: {failed.get((w, name), 'no run')}")
            rows.append(row)
        if ratio is not None:
            verdict = ("met" if ratio >= GOAL_RATIO
                       else f"NOT met (short by {GOAL_RATIO - ratio:.2f})")
            notes.append(f"W={w}: tunnel throughput is {ratio:.2f}x direct (median of "
                         f"{len(ratios[w])} paired rounds, per-round "
                         f"{', '.join(f'{r:.2f}' for r in ratios[w])}); goal >= "
                         f"{GOAL_RATIO:.1f}x: {verdict}")
    notes.append("vs direct: direct seconds / tunnel seconds in the same round, median. Both "
                 "are benchmark 1's ecloud run (SQLite boss, boss serve, one worker --burst), "
                 "timed from starting the worker to its exit.")
    if tunnel_runs:
        notes.append(f"sshd accepted {accepted} public-key login(s) for {tunnel_runs} tunnel "
                     "run(s) (one each: no reconnects)" if accepted == tunnel_runs else
                     f"sshd accepted {accepted} public-key login(s) for {tunnel_runs} tunnel "
                     "run(s): some worker reconnected")
    notes.append("cpu s: user + system CPU seconds of the processes the run started (boss "
                 "serve, the worker, its ssh client and its tasks; parallel and its tasks), "
                 "median; sshd cpu "
                 "s: sshd's own, for the tunnel (it decrypts and forwards every message).")
    columns = ["W", "contender", "how", "runs", "median s", "min s", "max s", "tasks/s",
               "vs direct", "cpu s", "sshd cpu s", "status"]
    used = [c for c in columns if any(c in r for r in rows)]
    return Report(title=f"ssh_tunnels: {tasks:,} `true` tasks, W slots, worker by SSH tunnel "
                        f"vs direct TCP, {repeat} round(s)",
                  columns=used, rows=rows, notes=notes)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ssh_tunnels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=10_000, help="N (default 10,000)")
    ap.add_argument("--slots", type=int, nargs="+", default=[2, 8],
                    help="W: the worker's slots, one run per value (default 2 8)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS),
                    help="contenders to run (default all)")
    return ap


def run(argv: list[str]) -> Report:
    args = parser().parse_args(argv)
    if args.tasks < 1 or args.repeat < 1 or min(args.slots) < 1:
        raise SystemExit("ssh_tunnels: --tasks, --repeat and --slots must be >= 1")
    result = measure(args.tasks, args.slots, args.repeat, args.runners)
    if any(str(r.get("status", "")).startswith("failed") for r in result["rows"]):
        print_report(result, sys.stderr)
        raise SystemExit("ssh_tunnels: a run failed (see the table above)")
    return result


def main(argv: list[str] | None = None) -> int:
    print_report(run(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
