"""claim order index: (state, priority DESC, id)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 14:50:00

The claim reads ready tasks ORDER BY priority DESC, id. The index of 0001
held priority ascending, so neither SQLite nor PostgreSQL could read that
order from it: every claim sorted all the ready tasks (measured on SQLite:
70 ms a claim with 200,000 ready tasks, 7.5 µs with this index).
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_state_priority_id')
    op.create_index('ix_tasks_claim_order', 'tasks',
                    ['state', sa.text('priority DESC'), 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_tasks_claim_order', table_name='tasks')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_state_priority_id', ['state', 'priority', 'id'],
                              unique=False)
