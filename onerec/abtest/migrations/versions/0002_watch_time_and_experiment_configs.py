"""Watch time per exposure (the watch-time primary metric) and the experiments' configured variants
(the scorecard's sample-ratio check needs the weights).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # rows written before this revision carried no plays: 0 s watched is what they had
    op.add_column("exposures", sa.Column("watch_s", sa.Float(), nullable=False, server_default="0"))
    op.create_table(
        "experiment_configs",
        sa.Column("name", sa.String(), primary_key=True),
        sa.Column("variants", sa.Text(), nullable=False),
        sa.Column("registered_ms", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("experiment_configs")
    with op.batch_alter_table("exposures") as batch:      # SQLite drops a column by copying the table
        batch.drop_column("watch_s")
