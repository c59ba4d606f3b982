"""The item entity and its statistics."""
from feast import Entity, ValueType

from _types import feature_view
from onerec.features.schema import ITEM_STATS

item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64,
              description="an item, by raw id (never a semantic ID: those belong to a model version)")
item_stats_push, item_stats = feature_view(ITEM_STATS, item)
