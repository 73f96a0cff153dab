"""10,000 `true` tasks on local workers (2 slots in all) vs `parallel -j2 true`.

Usage: .venv/bin/python benchmarks/true_10k.py [--tasks N] [--workers W] [--slots S]

Runs, in a temporary directory with the embedded defaults (SQLite, file
datastore): `boss init`, `boss push-tasks` of N tasks `["true"]`, `boss serve`,
W x `worker run --burst --slots S`, and times from the workers' start to the
last worker's exit (every task succeeded is checked). Then times
`parallel -j(W*S) true ::: 1..N` on the same machine. Prints both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--slots", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ecloud-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        (root / "ecloud.toml").write_text(
            f'[boss]\nlisten = "127.0.0.1:{port}"\n[worker]\npoll_seconds = 0.05\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECLOUD_")}
        tasks = root / "tasks.jsonl"
        tasks.write_text("".join(json.dumps({"name": f"t{i}", "commands": [
            {"command": ["true"]}]}) + "\n" for i in range(args.tasks)))

        def boss(*a: str) -> str:
            return subprocess.run([str(BIN / "boss"), *a], cwd=root, env=env, check=True,
                                  capture_output=True, text=True).stdout

        boss("init")
        boss("push-tasks", str(tasks))
        for i in range(args.workers):
            boss("admin", "add-worker", "--token-file", f"tok{i}", "--slots", str(args.slots))
        log = (root / "serve.log").open("w")
        server = subprocess.Popen([str(BIN / "boss"), "serve", "--no-autoscale"], cwd=root, env=env,
                                  stdout=log, stderr=log)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        t0 = time.perf_counter()
        workers = [subprocess.Popen(
            [str(BIN / "worker"), "run", "--boss", f"tcp://127.0.0.1:{port}",
             "--token-file", f"tok{i}", "--burst", "--slots", str(args.slots)],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for i in range(args.workers)]
        results = [json.loads(w.communicate()[0]) for w in workers]
        ecloud = time.perf_counter() - t0
        server.terminate()
        server.wait(30)
        log.close()
        ok = sum(r["succeeded"] for r in results)
        status = json.loads(boss("admin", "status", "--json"))
        assert ok == args.tasks, (results, status)
    jobs = args.workers * args.slots
    parallel = shutil.which("parallel")
    if parallel is None:
        print("GNU parallel is not installed (apt-get install parallel)")
        gnu = float("nan")
    else:
        t0 = time.perf_counter()
        subprocess.run([parallel, f"-j{jobs}", "true", ":::", *map(str, range(args.tasks))],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gnu = time.perf_counter() - t0
    print(f"tasks={args.tasks} slots={jobs}: ecloud {ecloud:.1f} s "
          f"({args.tasks / ecloud:.0f} tasks/s), parallel -j{jobs} {gnu:.1f} s "
          f"({args.tasks / gnu:.0f} tasks/s), ecloud/parallel = {ecloud / gnu:.2f}")


if __name__ == "__main__":
    main()
