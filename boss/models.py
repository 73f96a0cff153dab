"""SQLAlchemy models: the boss's whole state.

Times are UNIX seconds (float) so lease arithmetic is the same on SQLite and
PostgreSQL. The migrations in migrations/versions must match these models
(tests/migrations checks for drift).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints: SQLite's batch migrations need names to alter them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(20))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # the document as pushed (canonical JSON); workers get it verbatim
    document: Mapped[str] = mapped_column(Text)
    max_tries: Mapped[int] = mapped_column(Integer, default=1)
    tries: Mapped[int] = mapped_column(Integer, default=0)  # attempts that spent a retry
    lost: Mapped[int] = mapped_column(Integer, default=0)  # attempts lost with their worker
    # parents not yet succeeded; the task becomes ready when this reaches 0
    pending_parents: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)



# The claim's order, ready tasks by priority (highest first) then id, read straight
# off this index: with priority ascending in it, every claim sorted all the ready
# tasks (70 ms a claim at 200,000 ready; migration 0003).
Index("ix_tasks_claim_order", Task.state, Task.priority.desc(), Task.id)


class TaskStateCount(Base):
    """How many tasks are in each state, kept by triggers (migration 0002) and the push.

    `boss watch` and `boss admin status` read these seven rows instead of
    counting a million tasks on every refresh.
    """

    __tablename__ = "task_state_counts"

    state: Mapped[str] = mapped_column(String(20), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, default=0)


class TaskEdge(Base):
    """parent must succeed before child may run."""

    __tablename__ = "task_edges"

    parent_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    child_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )

    __table_args__ = (Index("ix_task_edges_child_id", "child_id"),)


class TaskOutput(Base):
    """Remote paths a task writes (``bucket:path``), for data-implied dependencies."""

    __tablename__ = "task_outputs"

    path: Mapped[str] = mapped_column(String(4200), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )


class Attempt(Base):
    """One try of a task. Its id is the fencing token a worker reports with."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True
    )
    state: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[float] = mapped_column(Float)
    lease_expires_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    exit_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    metrics: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    stdout_tail: Mapped[str | None] = mapped_column(Text, nullable=True)
    stderr_tail: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_attempts_task_id", "task_id"),
        # the reaper: running attempts by lease expiry
        Index("ix_attempts_state_lease", "state", "lease_expires_at"),
        # a worker's running attempts (events, heartbeats); by worker alone via its prefix
        Index("ix_attempts_worker_state", "worker_id", "state"),
    )


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    provider: Mapped[str] = mapped_column(String(20))
    reference: Mapped[str | None] = mapped_column(String(500), nullable=True)
    state: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(128))
    slots: Mapped[int] = mapped_column(Integer, default=1)
    address: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_workers_token_hash", "token_hash"),)


class Context(Base):
    """Key/value settings kept with the state (datastore, boss address, buckets)."""

    __tablename__ = "context"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(100))
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempt_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    data: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON

    __table_args__ = (
        Index("ix_events_task_id", "task_id"),
        Index("ix_events_ts", "ts"),
    )
