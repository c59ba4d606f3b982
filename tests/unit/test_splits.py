"""Splits: leave-last-out without leakage, and a clean time cut with the live part in replay order."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from tests.conftest import data_root
from onerec.data import DataError, leave_last_out, load_amazon_beauty, load_movielens_100k, online_split, time_split


@pytest.fixture(scope="module")
def ml():
    return load_movielens_100k(data_root()).interactions


@pytest.fixture(scope="module")
def beauty():
    return load_amazon_beauty(data_root()).interactions


def table(rows: list[tuple[int, int, int]]) -> pd.DataFrame:
    """(user, item, timestamp) rows as a minimal interactions table, in the given order."""
    u, i, t = zip(*rows)
    return pd.DataFrame({"user_id": np.array(u, dtype=np.int64), "item_id": np.array(i, dtype=np.int64),
                         "timestamp": np.array(t, dtype=np.int64)})


def keys(df: pd.DataFrame) -> list[tuple]:
    return sorted(map(tuple, df[["user_id", "item_id", "timestamp"]].to_numpy().tolist()))


# --------------------------------------------------------------------------- leave-last-out

def test_leave_last_out_movielens(ml):
    s = leave_last_out(ml)
    assert (len(s.train), len(s.valid), len(s.test)) == (100_000 - 2 * 943, 943, 943)
    assert keys(pd.concat([s.train, s.valid, s.test])) == keys(ml)  # each event in exactly one part
    assert list(s.test.columns) == list(ml.columns) and s.test.index.equals(pd.RangeIndex(943))
    # No leakage: per user, valid is not before any train event, test not before valid.
    last_train = s.train.groupby("user_id")["timestamp"].max()
    valid = s.valid.set_index("user_id")["timestamp"]
    test = s.test.set_index("user_id")["timestamp"]
    assert (valid >= last_train.loc[valid.index]).all()
    assert (test >= valid.loc[test.index]).all()
    # Ties (same second) are broken by row order: test is the user's last row of the sorted table.
    last_rows = ml.groupby("user_id").tail(1).reset_index(drop=True)
    pd.testing.assert_frame_equal(s.test, last_rows)


def test_leave_last_out_beauty_is_the_s3rec_protocol(beauty):
    # S3-Rec: the last item of each line of Beauty.txt is the test item, the one before it validation.
    lines = [list(map(int, l.split())) for l in (data_root() / "amazon-s3rec/Beauty.txt").read_text().split("\n") if l]
    s = leave_last_out(beauty)
    assert s.test["item_id"].tolist() == [l[-1] for l in lines]
    assert s.valid["item_id"].tolist() == [l[-2] for l in lines]
    assert len(s.train) == 198_502 - 2 * 22_363


def test_leave_last_out_is_deterministic_and_order_free():
    rows = [(1, 10, 5), (1, 11, 3), (1, 12, 9), (1, 13, 7), (2, 20, 1), (2, 21, 2), (2, 22, 3)]
    a = leave_last_out(table(rows))
    b = leave_last_out(table(rows))
    c = leave_last_out(table(rows[::-1]))  # distinct timestamps: input order does not matter
    for part in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(getattr(a, part), getattr(b, part))
        pd.testing.assert_frame_equal(getattr(a, part), getattr(c, part))
    assert a.test["item_id"].tolist() == [12, 22]
    assert a.valid["item_id"].tolist() == [13, 21]
    assert a.train["item_id"].tolist() == [11, 10, 20]


def test_short_users_go_to_train_and_ties_use_row_order():
    rows = [(1, 1, 1), (2, 1, 1), (2, 2, 2), (3, 5, 4), (3, 6, 4), (3, 7, 4)]
    s = leave_last_out(table(rows))
    assert sorted(s.train["user_id"].tolist()) == [1, 2, 2, 3]  # users 1 and 2 have < 3 events
    assert s.test["item_id"].tolist() == [7] and s.valid["item_id"].tolist() == [6]


def test_leave_last_out_needs_the_columns():
    with pytest.raises(DataError, match="lack column"):
        leave_last_out(pd.DataFrame({"user_id": [1]}))


# --------------------------------------------------------------------------- time split

def test_time_split_movielens(ml):
    s = time_split(ml, 0.2)
    assert len(s.history) + len(s.live) == len(ml)
    assert keys(pd.concat([s.history, s.live])) == keys(ml)
    assert s.history["timestamp"].max() < s.t0 <= s.live["timestamp"].min()
    assert isinstance(s.t0, int) and s.t0 == int(np.sort(ml["timestamp"].to_numpy())[80_000])
    assert 0.19 < len(s.live) / len(ml) < 0.21
    # Live is in replay order: time, then user, then original row.
    live = s.live[["timestamp", "user_id"]].to_numpy()
    assert (np.lexsort((live[:, 1], live[:, 0])) == np.arange(len(live))).all()
    # History stays in the canonical (user, time) order.
    hist = s.history[["user_id", "timestamp"]].to_numpy()
    assert (np.lexsort((hist[:, 1], hist[:, 0])) == np.arange(len(hist))).all()
    pd.testing.assert_frame_equal(time_split(ml, 0.2).live, s.live)  # deterministic


def test_time_split_ties_keep_original_order():
    rows = [(2, 1, 10), (1, 2, 10), (2, 3, 10), (1, 4, 1), (1, 5, 2), (2, 6, 3)]
    s = time_split(table(rows), 0.5)
    assert s.t0 == 10
    assert s.live["item_id"].tolist() == [2, 1, 3]  # same second: user 1 first, then user 2 in row order
    assert s.history["item_id"].tolist() == [4, 5, 6]


def test_time_split_beauty_cuts_by_position(beauty):
    s = time_split(beauty, 0.2)
    assert s.history["timestamp"].max() < s.t0 <= s.live["timestamp"].min()
    assert len(s.history) > 0 and len(s.live) > 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_time_split_rejects_bad_fractions(fraction):
    with pytest.raises(DataError, match=r"live_fraction=.* must be between 0 and 1"):
        time_split(table([(1, 1, 1), (1, 2, 2)]), fraction)


def test_time_split_without_history_is_an_error():
    with pytest.raises(DataError, match="leaves no history"):
        time_split(table([(1, 1, 5), (2, 2, 5), (3, 3, 5)]), 0.5)  # every event in the same second
    with pytest.raises(DataError, match="need at least 2"):
        time_split(table([(1, 1, 5)]), 0.5)


def test_time_split_holds_out_the_latest_events(ml):
    s = time_split(ml, 0.2, holdout_fraction=0.1)
    assert len(s.history) + len(s.live) + len(s.holdout) == len(ml)
    assert keys(pd.concat([s.history, s.live, s.holdout])) == keys(ml)
    assert s.history["timestamp"].max() < s.t0 <= s.live["timestamp"].min()
    assert s.live["timestamp"].max() < s.t1 <= s.holdout["timestamp"].min()
    ordered = np.sort(ml["timestamp"].to_numpy())
    assert (s.t0, s.t1) == (int(ordered[70_000]), int(ordered[90_000]))
    assert 0.09 < len(s.holdout) / len(ml) < 0.11 and 0.19 < len(s.live) / len(ml) < 0.21
    hold = s.holdout[["user_id", "timestamp"]].to_numpy()
    assert (np.lexsort((hold[:, 1], hold[:, 0])) == np.arange(len(hold))).all()   # (user, time)
    plain = time_split(ml, 0.2)
    assert plain.holdout.empty and plain.t1 is None


def test_online_split_uses_the_data_config(ml, debug_config):
    s = online_split(ml, debug_config.data)
    ref = time_split(ml, debug_config.data.live_fraction, debug_config.data.holdout_fraction)
    assert (s.t0, s.t1) == (ref.t0, ref.t1) and len(s.holdout) == len(ref.holdout) > 0


def test_time_split_rejects_a_holdout_that_leaves_no_history_or_no_live_events():
    with pytest.raises(DataError, match="holdout_fraction=0.8"):
        time_split(table([(1, i, i) for i in range(10)]), 0.3, holdout_fraction=0.8)
    with pytest.raises(DataError, match="leaves no live events"):
        time_split(table([(1, 1, 1), (1, 2, 2), (1, 3, 9), (1, 4, 9), (1, 5, 9)]), 0.2, holdout_fraction=0.4)
