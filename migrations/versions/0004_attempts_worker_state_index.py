"""attempts by (worker_id, state)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 16:30:00

Every event batch and every heartbeat asks for a worker's running attempts.
With an index on worker_id alone that read every attempt the worker ever ran
(10,000 rows late in a 10,000-task run, on each call); with the state in the
index it reads the few that run now. Lookups by worker alone use its prefix.
"""

from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index('ix_attempts_worker_id', table_name='attempts')
    op.create_index('ix_attempts_worker_state', 'attempts', ['worker_id', 'state'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_attempts_worker_state', table_name='attempts')
    op.create_index('ix_attempts_worker_id', 'attempts', ['worker_id'], unique=False)
