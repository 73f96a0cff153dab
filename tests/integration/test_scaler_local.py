"""The autoscaler in `boss serve` with the local provider: scale up, lose, replace, drain."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from boss.providers import provider_for
from boss.scaler import Scaler
from boss.service import Boss
from tests.bossd import serving
from tests.conftest import make_settings
from tests.integration.test_transitions import push, states, task
from tests.waiting import quick_pool, wait_for


def test_scale_up_lose_replace_and_drain(tmp_path: Path) -> None:
    s = make_settings(tmp_path, f"sqlite:///{tmp_path}/boss.db")
    quick_pool(s, slots=1, max_workers=2)
    (tmp_path / "data").mkdir()
    boss = Boss(s)
    boss.init()
    gate = tmp_path / "gate"
    pids = tmp_path / "pids"
    pids.mkdir()
    hold = f"echo $PPID > {pids}/$$; while [ ! -e {gate} ]; do sleep 0.05; done"
    push(boss, tmp_path, [task(f"t{i}", commands=[{"command": [hold], "shell": True}])
                          for i in range(3)])
    try:
        with serving(boss, 0, Scaler(boss, provider_for(s, "local"))):
            # backlog 3, one slot each, at most 2 workers
            wait_for(lambda: sorted(states(boss).values()) == ["ready", "running", "running"],
                     "two workers running two tasks")
            live = [w for w in boss.workers() if w["state"] in ("idle", "busy")]
            assert len(live) == 2 and {w["provider"] for w in live} == {"local"}
            # kill one worker outright (no goodbye): its lease expires, it is lost,
            # its task is requeued without spending a retry, a new worker replaces it
            victim = int(live[0]["reference"])
            os.killpg(victim, signal.SIGKILL)
            wait_for(lambda: any(w["state"] == "lost"
                                 for w in boss.workers(include_terminated=True)),
                     "the killed worker to be marked lost")
            gate.write_text("")
            wait_for(lambda: set(states(boss).values()) == {"succeeded"}, "every task done")
            for name in ("t0", "t1", "t2"):
                shown = boss.show(name)
                assert shown["tries"] <= 1, shown
            # the queue drained: the workers leave and nothing is left running
            wait_for(lambda: not [w for w in boss.workers() if w["state"] in
                                  ("provisioning", "idle", "busy", "draining")],
                     "the workers to leave")
        assert len(boss.workers(include_terminated=True)) >= 3  # one was a replacement
    finally:
        boss.close()
