"""Shared by the repo files: onerec's feature dtypes -> Feast types, and a view builder.
The offline sources are folders of parquet parts relative to ONEREC_FEAST_DIR."""
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float32, Float64, Int64

from onerec.features.schema import CREATED_TS, EVENT_TS, View

FEAST_TYPES = {"int64": Int64, "float32": Float32, "float64": Float64,
               "int64[]": Array(Int64), "float32[]": Array(Float32)}


def feature_view(view: View, entity: Entity) -> tuple[PushSource, FeatureView]:
    batch = FileSource(name=f"{view.name}_offline", path=f"offline/{view.name}",
                       timestamp_field=EVENT_TS, created_timestamp_column=CREATED_TS)
    push = PushSource(name=view.push_source, batch_source=batch)
    fv = FeatureView(name=view.name, entities=[entity], ttl=timedelta(days=view.ttl_days),
                     schema=[Field(name=n, dtype=FEAST_TYPES[t]) for n, t in view.fields],
                     source=push, online=True)
    return push, fv
