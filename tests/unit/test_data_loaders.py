"""Loaders: the real shared files match their published statistics; broken copies fail clearly."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from onerec.config import load_config
from tests.conftest import data_root
from onerec.data import (DataError, load_amazon_beauty, load_dataset, load_generic,
                         load_movielens_100k)

CANONICAL = ["user_id", "item_id", "timestamp", "rating", "play_duration", "item_duration", "label"]
DTYPES = ["int64", "int64", "int64", "float32", "float32", "float32", "float32"]


@pytest.fixture(scope="module")
def ml():
    return load_movielens_100k(data_root())


@pytest.fixture(scope="module")
def beauty():
    return load_amazon_beauty(data_root())


def assert_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns) == CANONICAL
    assert [str(t) for t in df.dtypes] == DTYPES
    assert df.index.equals(pd.RangeIndex(len(df)))
    keys = df[["user_id", "timestamp"]].to_numpy()
    assert (np.lexsort((keys[:, 1], keys[:, 0])) == np.arange(len(df))).all(), "not sorted by (user, ts)"


# --------------------------------------------------------------------------- real data

def test_movielens_matches_published_statistics(ml):
    inter = ml.interactions
    assert_canonical(inter)
    assert ml.name == "ml-100k"
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943
    assert len(ml.items) == 1682 and inter["item_id"].nunique() == 1682
    assert inter["timestamp"].min() == 874724710 and inter["timestamp"].max() == 893286638
    assert inter["rating"].value_counts().sort_index().tolist() == [6110, 11370, 27145, 34174, 21201]
    assert inter.groupby("user_id").size().min() == 20
    for col in ("play_duration", "item_duration", "label"):
        assert inter[col].isna().all()


def test_movielens_side_features(ml):
    items = ml.items
    assert list(items.columns) == ["item_id", "title", "year", "genres"]
    assert str(items["year"].dtype) == "Int64"
    toy = items.iloc[0]
    assert (toy["item_id"], toy["title"], toy["year"], toy["genres"]) == (1, "Toy Story (1995)", 1995, [3, 4, 5])
    unknown = items.set_index("item_id").loc[267]  # the one movie with a blank release date
    assert unknown["title"] == "unknown" and pd.isna(unknown["year"]) and unknown["genres"] == [0]
    assert items.set_index("item_id").loc[1373, "year"] == 1971  # its date is '4-Feb-1971' (one-digit day)

    users = ml.users
    assert list(users.columns) == ["user_id", "age", "gender", "occupation", "zip"]
    assert len(users) == 943 and users["user_id"].tolist() == list(range(1, 944))
    assert users.iloc[0].tolist() == [1, 24, "M", "technician", "85711"]
    assert set(users["gender"]) == {"M", "F"}
    assert users["zip"].str.fullmatch(r"\d+").sum() < 943  # some zips are Canadian postal codes: strings


def test_movielens_ties_keep_file_order(ml):
    # Half the ratings share a (user, second) with another one: the order among them is the file's.
    raw = pd.read_csv(data_root() / "ml-100k/u.data", sep="\t", names=["user_id", "item_id", "r", "t"])
    raw["line"] = np.arange(len(raw))
    merged = ml.interactions.merge(raw[["user_id", "item_id", "line"]], on=["user_id", "item_id"], how="left")
    assert merged["line"].notna().all()
    ties = merged[merged.duplicated(["user_id", "timestamp"], keep=False)]
    assert len(ties) > 50_000
    assert (ties.groupby(["user_id", "timestamp"])["line"].diff().dropna() > 0).all()


def test_beauty_matches_published_statistics(beauty):
    inter = beauty.interactions
    assert_canonical(inter)
    assert beauty.name == "amazon-beauty" and beauty.users is None
    assert (len(inter), inter["user_id"].nunique(), len(beauty.items)) == (198_502, 22_363, 12_101)
    lengths = inter.groupby("user_id").size()
    assert (lengths.min(), lengths.max()) == (5, 204)
    # No timestamps: the position in the user's sequence.
    assert (inter["timestamp"].to_numpy() == inter.groupby("user_id").cumcount().to_numpy()).all()
    assert inter[inter["user_id"] == 2]["item_id"].tolist() == [6, 7, 8, 9, 10, 4, 11]
    assert inter[["rating", "play_duration", "item_duration", "label"]].isna().all().all()
    attrs = beauty.items
    assert list(attrs.columns) == ["item_id", "attributes"]
    assert attrs["item_id"].tolist() == list(range(1, 12_102))
    assert attrs.set_index("item_id").loc[4, "attributes"] == [1, 2, 3]
    assert len({a for row in attrs["attributes"] for a in row}) == 637


def test_load_times():
    root = data_root()
    t = time.perf_counter()
    load_movielens_100k(root)
    ml_s = time.perf_counter() - t
    t = time.perf_counter()
    load_amazon_beauty(root)
    beauty_s = time.perf_counter() - t
    assert ml_s < 2.0, f"ml-100k took {ml_s:.2f} s"
    assert beauty_s < 3.0, f"Beauty took {beauty_s:.2f} s"


def test_load_dataset_debug_preset_keeps_first_users(ml):
    cfg = load_config("debug").data
    assert cfg.dataset == "ml-100k" and cfg.max_users == 100
    ds = load_dataset(cfg)
    assert sorted(ds.interactions["user_id"].unique()) == list(range(1, 101))
    expected = ml.interactions[ml.interactions["user_id"] <= 100].reset_index(drop=True)
    pd.testing.assert_frame_equal(ds.interactions, expected)
    assert len(ds.items) == 1682  # the whole catalogue
    assert ds.users["user_id"].tolist() == list(range(1, 101))


def test_load_dataset_beauty_all_users():
    cfg = dataclasses.replace(load_config("debug").data, dataset="amazon-beauty", max_users=0)
    assert load_dataset(cfg).interactions["user_id"].nunique() == 22_363


def test_load_dataset_generic_path_relative_to_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ONEREC_DATA_ROOT", raising=False)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/log.csv").write_text("user_id,item_id,timestamp\n3,1,5\n1,2,7\n2,2,1\n")
    cfg = dataclasses.replace(load_config("debug").data, root=str(tmp_path), dataset="generic",
                              path="logs/log.csv", max_users=2)
    ds = load_dataset(cfg)
    assert ds.interactions["user_id"].tolist() == [1, 2]
    assert ds.items["item_id"].tolist() == [1, 2]  # catalogue of the whole log
    monkeypatch.setenv("ONEREC_DATA_ROOT", str(tmp_path / "logs"))
    cfg = dataclasses.replace(cfg, path="log.csv", max_users=0)
    assert len(load_dataset(cfg).interactions) == 3


# --------------------------------------------------------------------------- generic format

def test_generic_csv(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("item_id,user_id,timestamp,play_duration,item_duration,label,device\n"
                    "10,2,100,5.5,30,1,phone\n"
                    "11,1,200,,60,0,tv\n"
                    "12,2,50,3,20,,tv\n"
                    "10,2,100,30,40,1,tv\n")
    ds = load_generic(path)
    inter = ds.interactions
    assert_canonical(inter)
    assert inter["user_id"].tolist() == [1, 2, 2, 2]
    assert inter["item_id"].tolist() == [11, 12, 10, 10]  # user 2's tie at t=100 keeps file order
    assert inter["play_duration"].tolist()[:3] == [pytest.approx(np.nan, nan_ok=True), 3.0, 5.5]
    assert inter["rating"].isna().all()  # no rating column: NaN
    assert np.isnan(inter["label"].iloc[1])  # an empty cell is "absent"
    assert "device" not in inter.columns  # unknown columns are ignored
    assert ds.items["item_id"].tolist() == [10, 11, 12]
    assert ds.items["item_duration"].tolist() == [35.0, 60.0, 20.0]  # median per item
    assert ds.users is None


def test_generic_parquet_with_datetime(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 1], "item_id": [5, 6], "rating": [4.0, 2.5],
                  "timestamp": pd.to_datetime(["1970-01-01 00:00:10", "2001-09-09 01:46:40"])}).to_parquet(path)
    ds = load_generic(path)
    assert_canonical(ds.interactions)
    assert ds.interactions["timestamp"].tolist() == [10, 1_000_000_000]
    assert ds.interactions["rating"].tolist() == [4.0, 2.5]
    assert list(ds.items.columns) == ["item_id"]


def test_generic_parquet_bad_row_is_numbered(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user_id": [1, 2, 3], "item_id": [5, 6, 7], "timestamp": [1, 2, 3],
                  "item_duration": [1.0, 2.0, -3.0]}).to_parquet(path)
    with pytest.raises(DataError, match=r"log\.parquet, row 3: item_duration must be >= 0"):
        load_generic(path)


GOOD_CSV = "user_id,item_id,timestamp,play_duration,label\n1,10,100,5,1\n1,11,101,6,0\n2,10,102,7,1\n"


@pytest.mark.parametrize("line, text, expected", [
    (3, "1,abc,101,6,0", r"line 3: item_id must be an integer \(got 'abc'\)"),
    (2, ",10,100,5,1", r"line 2: user_id must be an integer \(got '<empty>'\)"),
    (4, "2,10.5,102,7,1", r"line 4: item_id must be an integer \(got '10.5'\)"),
    (3, "1,11,-5,6,0", r"line 3: timestamp must be >= 0"),
    (3, "1,11,101.5,6,0", r"line 3: timestamp must be an integer"),
    (4, "2,10,102,-7,1", r"line 4: play_duration must be >= 0 seconds \(got '-7'\)"),
    (2, "1,10,100,inf,1", r"line 2: play_duration must be finite"),
    (3, "1,11,101,6,yes", r"line 3: label must be a number \(got 'yes'\)"),
    (4, "2,10,102,7,-inf", r"line 4: label must be finite"),
])
def test_generic_bad_value_names_file_and_line(tmp_path, line, text, expected):
    lines = GOOD_CSV.splitlines()
    lines[line - 1] = text
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=expected) as err:
        load_generic(path)
    assert str(path) in str(err.value)


def test_generic_blank_line_is_reported_at_its_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n1,2,3\n\n4,5,6\n")
    with pytest.raises(DataError, match=r"log\.csv, line 3: user_id must be an integer"):
        load_generic(path)


def test_generic_missing_columns_are_named(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user,item_id,time\n1,2,3\n")
    with pytest.raises(DataError, match=r"log\.csv: missing required column\(s\) user_id, timestamp "
                                        r"\(found: user, item_id, time\)"):
        load_generic(path)


def test_generic_bad_extension_and_missing_file(tmp_path):
    path = tmp_path / "log.json"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"log\.json: unsupported file type '\.json'.*\.csv.*\.parquet"):
        load_generic(path)
    with pytest.raises(DataError, match=r"nope\.csv: file not found; set data\.path"):
        load_generic(tmp_path / "nope.csv")


def test_generic_header_only(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interactions"):
        load_generic(path)


# --------------------------------------------------------------------------- broken MovieLens copies

@pytest.fixture
def ml_copy(tmp_path):
    """A MovieLens folder with the real u.item/u.user and the first 10 lines of u.data."""
    src, dst = data_root() / "ml-100k", tmp_path / "ml-100k"
    dst.mkdir()
    for name in ("u.item", "u.user", "u.occupation"):
        shutil.copy(src / name, dst / name)
    (dst / "u.data").write_text("".join(src.joinpath("u.data").read_text().splitlines(keepends=True)[:10]))
    return tmp_path


def break_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="latin-1").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="latin-1")


def test_ml_copy_loads(ml_copy):
    ds = load_movielens_100k(ml_copy)
    assert len(ds.interactions) == 10 and len(ds.items) == 1682


@pytest.mark.parametrize("line, text, expected", [
    (4, "22\t377\t1", r"u\.data, line 4: expected 4 '\\t'-separated fields .* found 3"),
    (7, "22\t377\t1\t878887116\t9", r"u\.data, line 7: expected 4 .* found 5"),
    (3, "x22\t377\t1\t878887116", r"u\.data, line 3: user_id 'x22' is not an integer"),
    (5, "22\t3.5\t1\t878887116", r"u\.data, line 5: item_id '3\.5' is not an integer"),
    (5, "22\t377\t7\t878887116", r"u\.data, line 5: rating must be an integer in 1\.\.5 \(got 7\)"),
    (2, "22\t377\t3\t0", r"u\.data, line 2: timestamp must be a positive unix time \(got 0\)"),
    (6, "22\t99999\t3\t878887116", r"u\.data, line 6: item_id is not in u\.item \(got 99999\)"),
    (10, "944\t377\t3\t878887116", r"u\.data, line 10: user_id is not in u\.user \(got 944\)"),
    (8, "", r"u\.data, line 8: expected 4 .* found 1"),
])
def test_ml_bad_u_data_line(ml_copy, line, text, expected):
    break_line(ml_copy / "ml-100k/u.data", line, text)
    with pytest.raises(DataError, match=expected):
        load_movielens_100k(ml_copy)


def test_ml_bad_u_item_and_u_user(ml_copy):
    item = ml_copy / "ml-100k/u.item"
    good_item = item.read_bytes()
    break_line(item, 3, "3|Four Rooms (1995)|01-Jan-1995||url|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|x|0|0")
    with pytest.raises(DataError, match=r"u\.item, line 3: genre flags must be 0 or 1"):
        load_movielens_100k(ml_copy)
    break_line(item, 3, "3|Four Rooms (1995)|1995||url|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0")
    with pytest.raises(DataError, match=r"u\.item, line 3: release date .* \(got '1995'\)"):
        load_movielens_100k(ml_copy)
    item.write_bytes(good_item)

    user = ml_copy / "ml-100k/u.user"
    break_line(user, 2, "2|53|X|other|94043")
    with pytest.raises(DataError, match=r"u\.user, line 2: gender must be M or F \(got 'X'\)"):
        load_movielens_100k(ml_copy)
    break_line(user, 2, "2|53|F|astronaut|94043")
    with pytest.raises(DataError, match=r"u\.user, line 2: occupation is not listed in u\.occupation"):
        load_movielens_100k(ml_copy)


def test_ml_missing_file_says_how_to_point_at_the_data(ml_copy):
    (ml_copy / "ml-100k/u.data").unlink()
    with pytest.raises(DataError, match=r"ml-100k/u\.data: file not found; set data\.root .*ONEREC_DATA_ROOT"):
        load_movielens_100k(ml_copy)


# --------------------------------------------------------------------------- broken Beauty copies

@pytest.fixture
def beauty_copy(tmp_path):
    src, dst = data_root() / "amazon-s3rec", tmp_path / "amazon-s3rec"
    dst.mkdir()
    shutil.copy(src / "Beauty_item2attributes.json", dst)
    (dst / "Beauty.txt").write_text("".join(src.joinpath("Beauty.txt").read_text().splitlines(keepends=True)[:8]))
    return tmp_path


def test_beauty_copy_loads(beauty_copy):
    ds = load_amazon_beauty(beauty_copy)
    assert ds.interactions["user_id"].nunique() == 8


@pytest.mark.parametrize("line, text, expected", [
    (3, "3 4 12 x13 14", r"Beauty\.txt, line 3: 'x13' is not an integer id"),
    (5, "5", r"Beauty\.txt, line 5: user 5 has no items"),
    (6, "2 1 2 3", r"Beauty\.txt, line 6: user 2 appears on two lines"),
    (4, "4 1 99999 2", r"Beauty\.txt, line 4: item 99999 has no entry in Beauty_item2attributes\.json"),
])
def test_beauty_bad_line(beauty_copy, line, text, expected):
    break_line(beauty_copy / "amazon-s3rec/Beauty.txt", line, text)
    with pytest.raises(DataError, match=expected):
        load_amazon_beauty(beauty_copy)


def test_beauty_bad_or_missing_attributes(beauty_copy):
    attrs = beauty_copy / "amazon-s3rec/Beauty_item2attributes.json"
    attrs.write_text('{"1": [1, 2],\n "2": [3,]}')
    with pytest.raises(DataError, match=r"Beauty_item2attributes\.json, line 2: not valid JSON"):
        load_amazon_beauty(beauty_copy)
    attrs.write_text(json.dumps({"1": [1, "a"]}))
    with pytest.raises(DataError, match=r"item 1: attributes must be a list of integers"):
        load_amazon_beauty(beauty_copy)
    attrs.unlink()
    with pytest.raises(DataError, match=r"Beauty_item2attributes\.json: file not found; .*amazon-s3rec/"):
        load_amazon_beauty(beauty_copy)


def test_unknown_dataset_name():
    cfg = dataclasses.replace(load_config("debug").data, dataset="netflix")  # replace skips validate()
    with pytest.raises(DataError, match="unknown data set 'netflix'"):
        load_dataset(cfg)
