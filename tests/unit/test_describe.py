"""describe / format_table on the real data sets and a tiny hand-made one."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from tests.conftest import data_root
from onerec.data import Dataset, describe, load_amazon_beauty, load_movielens_100k
from onerec.data.describe import format_table


def test_describe_movielens():
    stats = describe(load_movielens_100k(data_root()))
    assert (stats["users"], stats["items"], stats["items_interacted"], stats["interactions"]) == (943, 1682, 1682, 100_000)
    assert stats["sparsity"] == pytest.approx(1 - 100_000 / (943 * 1682))
    assert (stats["per_user_min"], stats["per_user_max"], stats["per_user_median"]) == (20, 737, 65.0)
    assert stats["per_user_mean"] == pytest.approx(100_000 / 943)
    assert (stats["first_timestamp"], stats["last_timestamp"]) == (874724710, 893286638)
    assert (stats["first_date"], stats["last_date"]) == ("1997-09-20T03:05:10Z", "1998-04-22T23:10:38Z")
    assert stats["ratings"] == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}

    text = format_table(stats)
    lines = text.splitlines()
    assert "users             943" in lines  # keys padded to one column width
    assert "interactions      100,000" in lines
    assert "first_timestamp   874724710" in lines  # no thousands separators in a timestamp
    assert "ratings" in lines and "  4               34,174" in lines


def test_describe_beauty_has_no_dates():
    stats = describe(load_amazon_beauty(data_root()))
    assert (stats["users"], stats["items"], stats["interactions"]) == (22_363, 12_101, 198_502)
    assert stats["timestamps"] == "sequence positions"
    assert "first_date" not in stats and "ratings" not in stats
    assert (stats["per_user_min"], stats["per_user_max"]) == (5, 204)
    assert "timestamps        sequence positions" in format_table(stats).splitlines()


def test_describe_counts_the_whole_catalogue():
    inter = pd.DataFrame({
        "user_id": np.array([1, 1, 2], dtype=np.int64), "item_id": np.array([10, 11, 10], dtype=np.int64),
        "timestamp": np.array([0, 86_400, 60], dtype=np.int64),
        "rating": np.array([np.nan] * 3, dtype=np.float32),
    })
    ds = Dataset("generic", inter, pd.DataFrame({"item_id": [10, 11, 12, 13]}), None)
    stats = describe(ds)
    assert (stats["items"], stats["items_interacted"]) == (4, 2)
    assert stats["sparsity"] == pytest.approx(1 - 3 / 8)
    assert stats["per_user_mean"] == 1.5
    assert (stats["first_date"], stats["last_date"]) == ("1970-01-01T00:00:00Z", "1970-01-02T00:00:00Z")
    assert "ratings" not in stats  # all NaN: no distribution
    assert format_table(stats).splitlines()[0] == "dataset           generic"
