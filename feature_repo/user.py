"""The user entity and its views: the behaviour sequence and the aggregates."""
from feast import Entity, ValueType

from _types import feature_view
from onerec.features.schema import USER_AGGREGATES, USER_SEQUENCE

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="a user, by raw id")
user_sequence_push, user_sequence = feature_view(USER_SEQUENCE, user)
user_aggregates_push, user_aggregates = feature_view(USER_AGGREGATES, user)
