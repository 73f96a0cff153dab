"""The autoscaler's loop in `boss serve`: observe, decide (pure), act through the provider.

:func:`boss.autoscale.decide` says how many workers to create, which idle ones
to drain and which silent ones are lost; :class:`Scaler` gathers what it
needs from the service, calls it, and carries the decision out: creates
workers through the provider, marks workers draining (their next ``pop``
answers ``drain``, they say goodbye), marks lost ones (their attempts are
requeued without spending retries), deletes the instances of workers that
ended, and now and then deletes orphans: instances the provider runs for
this boss that the Workers table does not know.

Provider calls block (HTTP, SSH), so `boss serve` runs :meth:`Scaler.tick`
on a thread of its own, never on the event loop.
"""

from __future__ import annotations

import logging
import time

from boss.autoscale import Decision, Observed, Policy, WorkerView, decide
from boss.errors import BossError
from boss.providers import Provider
from boss.service import Boss

log = logging.getLogger(__name__)
ORPHAN_EVERY = 30  # ticks between orphan sweeps (a list call can be slow and costly)


class Scaler:
    def __init__(self, boss: Boss, provider: Provider) -> None:
        self.boss = boss
        self.provider = provider
        self.ticks = 0
        s = boss.settings
        self.policy = Policy(min_workers=s.autoscale.min_workers,
                             max_workers=s.autoscale.max_workers, slots=s.worker.slots,
                             idle_seconds=s.autoscale.idle_seconds,
                             lease_seconds=s.boss.lease_seconds,
                             boot_seconds=s.autoscale.boot_seconds)

    def observe(self) -> Observed:
        counts = self.boss.progress()["tasks"]
        views = tuple(
            WorkerView(id=v["id"], state=v["state"], slots=v["slots"], running=v["running"],
                       created_at=v["created_at"], last_seen=v["last_seen"],
                       idle_since=None if v["running"] else
                       max(x for x in (v["last_end"], v["last_seen"], v["created_at"])
                           if x is not None))
            for v in self.boss.worker_views() if v["provider"] == self.provider.name)
        return Observed(now=time.time(), ready=counts.get("ready", 0),
                        waiting=counts.get("waiting", 0), running=counts.get("running", 0),
                        workers=views)

    def tick(self) -> Decision:
        """One round: observe, decide, act. Errors are logged; the next tick tries again."""
        self.ticks += 1
        decision = decide(self.observe(), self.policy)
        if decision.lost:
            for row in self.boss.lose_workers(decision.lost):
                log.warning("worker %s lost (silent past its lease)", row.name)
        if decision.drain:
            drained = self.boss.drain_workers(decision.drain)
            log.info("draining %d idle worker(s): %s", len(drained), decision.reason)
        if decision.create:
            results = self.boss.instantiate(decision.create, self.provider,
                                            self.policy.slots, self.boss.settings.autoscale.spot)
            log.info("created %d worker(s) (%s)", len(results), decision.reason)
        self._delete_ended()
        if self.ticks % ORPHAN_EVERY == 1:
            self._delete_orphans()
        return decision

    def _delete_ended(self) -> None:
        for worker_id, reference in self.boss.ended_instances(self.provider.name):
            try:
                self.provider.delete(reference)
            except BossError as exc:
                log.warning("deleting worker %s (%s): %s", worker_id, reference, exc)
                continue
            self.boss.forget_instance(worker_id)

    def _delete_orphans(self) -> None:
        known = self.boss.known_references(self.provider.name)
        for inst in self.provider.list():
            if inst.reference not in known:
                log.warning("deleting orphan %s (%s): not in the Workers table",
                            inst.name, inst.reference)
                try:
                    self.provider.delete(inst.reference)
                except BossError as exc:
                    log.warning("deleting orphan %s: %s", inst.reference, exc)

    def shutdown(self) -> None:
        """`boss serve` is stopping: stop the workers it started."""
        live = [v for v in self.boss.worker_views() if v["provider"] == self.provider.name]
        if live:
            self.boss.terminate([str(v["id"]) for v in live], lambda _name: self.provider)
        self.provider.close()
