"""task_state_counts: tasks per state, kept by triggers

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 13:10:00

Counting a million tasks by state takes ~130 ms on SQLite, too slow for a
dashboard refreshed every second. This table holds one row per state. A
trigger moves a task from one count to another whenever its state changes
(row-level on SQLite; statement-level with transition tables on PostgreSQL,
so that a claim of 100 tasks is one update of the counts). On PostgreSQL the
trigger locks the seven rows in one order, so concurrent writers that change
task states take turns there (one boss has one writer anyway). Inserts have no
trigger: the push adds its tasks to the counts in bulk, in its transaction,
because a row trigger on a million inserts costs seconds.
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

STATES = ("waiting", "ready", "running", "succeeded", "failed", "upstream_failed",
          "cancelled")

SQLITE_TRIGGER = """
CREATE TRIGGER task_state_counts_move AFTER UPDATE OF state ON tasks
WHEN old.state IS NOT new.state
BEGIN
    UPDATE task_state_counts SET n = n - 1 WHERE state = old.state;
    UPDATE task_state_counts SET n = n + 1 WHERE state = new.state;
END
"""

PG_FUNCTION = """
CREATE FUNCTION task_state_counts_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- all seven rows, always in one order: two transactions never wait on each
    -- other in a cycle (state changes of concurrent writers serialize here)
    PERFORM 1 FROM task_state_counts ORDER BY state FOR UPDATE;
    UPDATE task_state_counts AS c SET n = c.n + d.delta
    FROM (SELECT state, sum(delta) AS delta
          FROM (SELECT state, 1 AS delta FROM moved_to
                UNION ALL SELECT state, -1 FROM moved_from) AS x
          GROUP BY state HAVING sum(delta) <> 0) AS d
    WHERE c.state = d.state;
    RETURN NULL;
END
$$
"""

PG_TRIGGER = """
CREATE TRIGGER task_state_counts_move AFTER UPDATE ON tasks
REFERENCING OLD TABLE AS moved_from NEW TABLE AS moved_to
FOR EACH STATEMENT EXECUTE FUNCTION task_state_counts_move()
"""


def upgrade() -> None:
    op.create_table('task_state_counts',
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('state', name=op.f('pk_task_state_counts'))
    )
    for state in STATES:
        op.execute(sa.text("INSERT INTO task_state_counts (state, n) "
                           "SELECT :s, count(*) FROM tasks WHERE state = :s").bindparams(s=state))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        op.execute(PG_TRIGGER)
    else:
        op.execute(SQLITE_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS task_state_counts_move"
               + (" ON tasks" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS task_state_counts_move()")
    op.drop_table('task_state_counts')
