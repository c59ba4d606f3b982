"""The ingestor's bulk-observed histogram exposes exactly what prometheus_client's Histogram would."""
import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from onerec.stream.ingest import BulkHistogram

BUCKETS = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


def test_bulk_histogram_matches_prometheus_histogram():
    values = np.concatenate([np.random.default_rng(0).exponential(0.4, 1000), BUCKETS, [0.0, 31.0, 1e6]])
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BulkHistogram("fresh_seconds", "doc", BUCKETS, ours_registry)
    theirs = Histogram("fresh_seconds", "doc", buckets=BUCKETS, registry=theirs_registry)
    ours.observe_many(values[:500])  # in two batches: counts accumulate
    ours.observe_many(values[500:])
    for v in values:
        theirs.observe(v)
    for bound in (*[str(float(b)) for b in BUCKETS], "+Inf"):
        assert ours_registry.get_sample_value("fresh_seconds_bucket", {"le": bound}) == \
            theirs_registry.get_sample_value("fresh_seconds_bucket", {"le": bound}), bound
    assert ours_registry.get_sample_value("fresh_seconds_count") == len(values)
    assert np.isclose(ours_registry.get_sample_value("fresh_seconds_sum"),
                      theirs_registry.get_sample_value("fresh_seconds_sum"))
    assert b"fresh_seconds_bucket" in generate_latest(ours_registry)  # the /metrics text renders
