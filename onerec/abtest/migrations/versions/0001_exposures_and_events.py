"""The A/B store: exposures (one row per request id) and the users' events (one per event id).

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "exposures",
        sa.Column("request_id", sa.String(), primary_key=True),
        sa.Column("experiment", sa.String(), nullable=True),
        sa.Column("variant", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("served_ms", sa.BigInteger(), nullable=False),
        sa.Column("fallback", sa.String(), nullable=True),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=False),
        sa.Column("reacted", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("items", sa.Text(), nullable=False),
    )
    op.create_index("ix_exposures_experiment_served_ms", "exposures", ["experiment", "served_ms"])
    op.create_table(
        "events",
        sa.Column("event_id", sa.String(), primary_key=True),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("item_id", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(), nullable=False),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=True),
    )
    op.create_index("ix_events_user_id_time_ms", "events", ["user_id", "time_ms"])


def downgrade() -> None:
    op.drop_index("ix_events_user_id_time_ms", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_exposures_experiment_served_ms", table_name="exposures")
    op.drop_table("exposures")
