"""Workers and the Context table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from boss.errors import NotFound
from boss.lifecycle import AttemptState
from boss.models import Attempt, Context, Task, Worker
from boss.store import fast


def create(conn: Connection, *, name: str, provider: str, slots: int, token_hash: str,
           now: float, reference: str | None = None, state: str = "provisioning") -> int:
    return int(conn.execute(
        insert(Worker).returning(Worker.id),
        {"name": name, "provider": provider, "slots": slots, "token_hash": token_hash,
         "reference": reference, "state": state, "created_at": now},
    ).scalar_one())


def by_token(conn: Connection, token_hash: str) -> Any:
    return conn.execute(
        select(Worker).where(Worker.token_hash == token_hash,
                             Worker.state.not_in(["terminated"]))
    ).first()


def by_name_or_id(conn: Connection, ref: str) -> Any:
    cond = Worker.name == ref
    if ref.isdigit():
        cond = cond | (Worker.id == int(ref))
    row = conn.execute(select(Worker).where(cond)).first()
    if row is None:
        raise NotFound(f"no worker {ref!r} (see `boss admin show-workers`)")
    return row


def update_worker(conn: Connection, worker_id: int, **values: Any) -> None:
    conn.execute(update(Worker).where(Worker.id == worker_id).values(**values))


def listing(conn: Connection, include_terminated: bool = False) -> list[dict[str, Any]]:
    running = (
        select(Attempt.worker_id, func.count().label("n"))
        .where(Attempt.state == AttemptState.RUNNING)
        .group_by(Attempt.worker_id).subquery()
    )
    q = (select(Worker, func.coalesce(running.c.n, 0).label("running"))
         .outerjoin(running, running.c.worker_id == Worker.id).order_by(Worker.id))
    if not include_terminated:
        q = q.where(Worker.state != "terminated")
    out = []
    for row in conn.execute(q).all():
        w, n = row, row.running
        names = conn.execute(
            select(Task.name).join(Attempt, Attempt.task_id == Task.id)
            .where(Attempt.worker_id == w.id, Attempt.state == AttemptState.RUNNING)
            .limit(5)).scalars().all() if n else []
        out.append({"id": w.id, "name": w.name, "provider": w.provider, "state": w.state,
                    "reference": w.reference, "address": w.address, "slots": w.slots,
                    "created_at": w.created_at, "last_seen": w.last_seen, "error": w.error,
                    "running": int(n), "tasks": list(names)})
    return out


def counts(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(Worker.state, func.count()).group_by(Worker.state)).all()
    return {state: int(n) for state, n in rows}


def errors(conn: Connection) -> list[tuple[str, int]]:
    """Provider errors of workers that were never created, grouped."""
    rows = conn.execute(
        select(Worker.error, func.count()).where(Worker.error.is_not(None),
                                                 Worker.state == "failed")
        .group_by(Worker.error)).all()
    return [(str(e), int(n)) for e, n in rows]


def context(conn: Connection) -> dict[str, str]:
    return {k: v for k, v in conn.execute(select(Context.key, Context.value).order_by(Context.key))}


def set_context(conn: Connection, key: str, value: str) -> None:
    if conn.execute(select(Context.key).where(Context.key == key)).first():
        conn.execute(update(Context).where(Context.key == key).values(value=value))
    else:
        conn.execute(insert(Context), {"key": key, "value": value})


def drop_context(conn: Connection, keys: Sequence[str] | None = None) -> int:
    stmt = delete(Context)
    if keys:
        stmt = stmt.where(Context.key.in_(keys))
    return int(conn.execute(stmt).rowcount or 0)


def state_of(conn: Connection, worker_id: int) -> str | None:
    found = fast.execute(conn, _STATE_OF, {"p_worker": worker_id})
    return found[0][0] if found else None


def seen(conn: Connection, worker_id: int, now: float, state: str | None = None) -> None:
    """The worker called (pop, heartbeat): its last contact, and its state if given."""
    if state is None:
        fast.execute(conn, _SEEN, {"p_worker": worker_id, "p_now": now})
    else:
        fast.execute(conn, _SEEN_AS, {"p_worker": worker_id, "p_now": now, "p_state": state})


# built once: these run on every pop and heartbeat
_STATE_OF = select(Worker.state).where(Worker.id == bindparam("p_worker"))
_SEEN = update(Worker).where(Worker.id == bindparam("p_worker")).values(
    last_seen=bindparam("p_now"))
_SEEN_AS = update(Worker).where(Worker.id == bindparam("p_worker")).values(
    last_seen=bindparam("p_now"), state=bindparam("p_state"))


LIVE = ("provisioning", "idle", "busy", "draining")


def views(conn: Connection) -> list[dict[str, Any]]:
    """Every live worker with what the autoscaler weighs: running count, idle since."""
    running = (select(Attempt.worker_id, func.count().label("n"))
               .where(Attempt.state == AttemptState.RUNNING)
               .group_by(Attempt.worker_id).subquery())
    last_end = (select(Attempt.worker_id, func.max(Attempt.finished_at).label("t"))
                .group_by(Attempt.worker_id).subquery())
    rows = conn.execute(
        select(Worker.id, Worker.name, Worker.address, Worker.state, Worker.slots,
               Worker.created_at, Worker.last_seen, Worker.provider, Worker.reference,
               func.coalesce(running.c.n, 0).label("running"), last_end.c.t.label("last_end"))
        .outerjoin(running, running.c.worker_id == Worker.id)
        .outerjoin(last_end, last_end.c.worker_id == Worker.id)
        .where(Worker.state.in_(LIVE)).order_by(Worker.id)).all()
    return [dict(r._mapping) for r in rows]


def by_ids(conn: Connection, ids: Sequence[int]) -> list[Any]:
    return list(conn.execute(select(Worker).where(Worker.id.in_(ids))).all())


def set_state(conn: Connection, ids: Sequence[int], state: str, now: float,
              only_from: Sequence[str] = LIVE) -> list[int]:
    return list(conn.execute(
        update(Worker).where(Worker.id.in_(ids), Worker.state.in_(only_from))
        .values(state=state, last_seen=func.coalesce(Worker.last_seen, now))
        .returning(Worker.id)).scalars().all())


def undeleted(conn: Connection, provider: str) -> list[Any]:
    """Workers of ``provider`` that ended but whose instance may still exist."""
    return list(conn.execute(
        select(Worker.id, Worker.reference).where(
            Worker.provider == provider, Worker.reference.is_not(None),
            Worker.state.in_(["terminated", "lost"]))).all())


def references(conn: Connection, provider: str) -> set[str]:
    refs = conn.execute(select(Worker.reference).where(
        Worker.provider == provider, Worker.reference.is_not(None))).scalars()
    return {r for r in refs if r}
