"""Dataset loaders: validate the raw files in `../shared/data` and return one canonical shape.

Every loader returns a `Dataset` whose interactions table has exactly these columns, in order:

    user_id        int64
    item_id        int64
    timestamp      int64    unix seconds; Amazon Beauty has none: the position in the user's sequence
    rating         float32  NaN if the data set has no ratings
    play_duration  float32  seconds watched, NaN if absent
    item_duration  float32  length of the item in seconds, NaN if absent
    label          float32  NaN if absent

sorted by (user_id, timestamp); ties keep file order (stable sort), the index is 0..n-1.

Files are parsed with vectorized pandas/numpy, then validated as a whole; on a problem the
DataError names the file, the first bad line (1-based, as an editor shows it) and the bad value.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from onerec.config import DataConfig

INTERACTION_COLUMNS = {
    "user_id": np.int64, "item_id": np.int64, "timestamp": np.int64, "rating": np.float32,
    "play_duration": np.float32, "item_duration": np.float32, "label": np.float32,
}
# Data sets whose `timestamp` is a position in the user's sequence, not unix seconds.
SEQUENCE_POSITION_DATASETS = frozenset({"amazon-beauty"})

ML100K_DIR = "ml-100k"
BEAUTY_DIR = "amazon-s3rec"
ML_GENRES = 19  # u.item ends with 19 0/1 genre flags (u.genre: unknown, Action, ..., Western)

_ROOT_HINT = "set data.root in the config preset (or the ONEREC_DATA_ROOT environment variable) " \
             "to the folder that holds '{folder}/'"
_FIX_LINE = "fix or remove that line"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the line and what to do."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames with == is ambiguous
class Dataset:
    name: str
    interactions: pd.DataFrame    # the canonical table above
    items: pd.DataFrame           # item_id + the side features this data set has; the whole catalogue
    users: pd.DataFrame | None    # user side features, None if the data set has none

    @property
    def real_time(self) -> bool:
        """True when `timestamp` is unix seconds (False: sequence positions)."""
        return self.name not in SEQUENCE_POSITION_DATASETS


# --------------------------------------------------------------------------- helpers

def _error(path: Path, line: int | None, problem: str, todo: str) -> DataError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return DataError(f"{where}: {problem}; {todo}")


def _require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: file not found; {hint}")
    return path


def _read_fields(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """Split a headerless delimited file into string columns, checking the field count per line.

    We split the text ourselves instead of pd.read_csv because read_csv silently pads short
    lines with NaN and turns surplus leading fields into an index; here every line must match.
    """
    text = path.read_text(encoding=encoding)  # latin-1 never fails: bad bytes surface as bad values
    lines = pd.Series(text.split("\n"))
    if len(lines) and lines.iloc[-1] == "":
        lines = lines.iloc[:-1]  # the newline that ends the last line
    if len(lines) == 0:
        raise _error(path, None, "the file is empty", "restore the original file")
    lines = lines.str.removesuffix("\r")
    counts = lines.str.count(re.escape(sep)).to_numpy() + 1
    bad = np.flatnonzero(counts != len(names))
    if len(bad):
        i = int(bad[0])
        raise _error(path, i + 1, f"expected {len(names)} {sep!r}-separated fields "
                     f"({' '.join(names)}), found {counts[i]}: {lines.iloc[i]!r}", _FIX_LINE)
    fields = lines.str.split(sep, n=len(names) - 1, expand=True, regex=False)
    fields.columns = names
    return fields.reset_index(drop=True)


def _int_field(fields: pd.DataFrame, name: str, path: Path) -> np.ndarray:
    """A string column as int64; the first non-integer is reported with its line number."""
    col = fields[name].str.strip()
    ok = col.str.fullmatch(r"[+-]?\d{1,18}").to_numpy(dtype=bool)  # 18 digits: always fits int64
    if not ok.all():
        i = int(np.argmin(ok))
        raise _error(path, i + 1, f"{name} {fields[name].iloc[i]!r} is not an integer", _FIX_LINE)
    return col.astype(np.int64).to_numpy()


def _read_int_table(path: Path, sep: str, names: list[str]) -> list[np.ndarray]:
    """A headerless all-integer file as int64 columns.

    Fast path: pandas' C parser (~30 ms for u.data). It rejects a bad file without saying
    clearly where, so on any failure the plain path re-reads it line by line and reports the
    first bad line; if the plain path finds nothing wrong, its values are used.
    """
    try:
        df = pd.read_csv(path, sep=sep, header=None, names=names, dtype=np.int64, encoding="latin-1",
                         quoting=csv.QUOTE_NONE, skip_blank_lines=False, engine="c")
        return [df[n].to_numpy() for n in names]
    except (ValueError, OverflowError, pd.errors.ParserError):  # EmptyDataError is a ValueError
        fields = _read_fields(path, sep, names)
        return [_int_field(fields, n, path) for n in names]


def _first_bad(path: Path, bad: np.ndarray, problem: str, values, line_offset: int = 1,
               unit: str = "line", todo: str = _FIX_LINE) -> None:
    """Raise for the first True in `bad`; row i is `unit` i + line_offset in the file."""
    idx = np.flatnonzero(bad)
    if len(idx):
        i = int(idx[0])
        value = values[i].item() if isinstance(values[i], np.generic) else values[i]  # 7, not np.int64(7)
        raise DataError(f"{path}, {unit} {i + line_offset}: {problem} (got {value!r}); {todo}")


def _canonical(user_id, item_id, timestamp, **optional) -> pd.DataFrame:
    """Build the canonical interactions table (absent optional columns are NaN), sorted."""
    n = len(user_id)
    data = {"user_id": user_id, "item_id": item_id, "timestamp": timestamp}
    for name in ("rating", "play_duration", "item_duration", "label"):
        values = optional.get(name)
        data[name] = np.full(n, np.nan) if values is None else values
    df = pd.DataFrame({k: np.asarray(v, dtype=INTERACTION_COLUMNS[k]) for k, v in data.items()})
    order = np.lexsort((df["timestamp"].to_numpy(), df["user_id"].to_numpy()))  # lexsort is stable
    return df.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------- MovieLens 100K

def load_movielens_100k(root: Path) -> Dataset:
    """MovieLens 100K from `root/ml-100k`: u.data (ratings), u.item (movies), u.user (users).

    Items: item_id, title, year (Int64, from the release date; <NA> where it is blank),
    genres (list of indices 0..18 into u.genre). Users: user_id, age, gender, occupation, zip
    (zip is a string: some are Canadian postal codes).
    """
    folder = Path(root) / ML100K_DIR
    hint = _ROOT_HINT.format(folder=ML100K_DIR)
    items = _ml_items(_require(folder / "u.item", hint))
    users = _ml_users(_require(folder / "u.user", hint), folder / "u.occupation")

    path = _require(folder / "u.data", hint)
    user, item, rating, ts = _read_int_table(path, "\t", ["user_id", "item_id", "rating", "timestamp"])
    _first_bad(path, (rating < 1) | (rating > 5), "rating must be an integer in 1..5", rating)
    _first_bad(path, ts <= 0, "timestamp must be a positive unix time", ts)
    _first_bad(path, ~np.isin(item, items["item_id"].to_numpy()),
               "item_id is not in u.item", item, todo="use the u.data and u.item of the same release")
    _first_bad(path, ~np.isin(user, users["user_id"].to_numpy()),
               "user_id is not in u.user", user, todo="use the u.data and u.user of the same release")
    interactions = _canonical(user, item, ts, rating=rating)
    return Dataset("ml-100k", interactions, items, users)


def _ml_items(path: Path) -> pd.DataFrame:
    names = ["item_id", "title", "release_date", "video_release_date", "url"] + \
            [f"g{i}" for i in range(ML_GENRES)]
    fields = _read_fields(path, "|", names)
    item_id = _int_field(fields, "item_id", path)
    _first_bad(path, pd.Series(item_id).duplicated().to_numpy(), "item_id appears twice", item_id)

    date = fields["release_date"].str.strip()
    year = date.str.extract(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")[0]
    _first_bad(path, (year.isna() & (date != "")).to_numpy(),
               "release date is not DD-Mon-YYYY or blank", date.to_numpy())

    flags = fields[names[5:]]
    ok = flags.isin(["0", "1"]).to_numpy()
    row = np.flatnonzero(~ok.all(axis=1))
    if len(row):
        i = int(row[0])
        raise _error(path, i + 1, f"genre flags must be 0 or 1, got {'|'.join(flags.iloc[i])!r}",
                     _FIX_LINE)
    flags = flags.to_numpy() == "1"
    return pd.DataFrame({
        "item_id": item_id,
        "title": fields["title"].to_numpy(dtype=object),
        "year": pd.array(pd.to_numeric(year), dtype="Int64"),
        "genres": [np.flatnonzero(r).tolist() for r in flags],
    }).sort_values("item_id", kind="stable").reset_index(drop=True)


def _ml_users(path: Path, occupation_path: Path) -> pd.DataFrame:
    fields = _read_fields(path, "|", ["user_id", "age", "gender", "occupation", "zip"])
    user_id = _int_field(fields, "user_id", path)
    age = _int_field(fields, "age", path)
    _first_bad(path, pd.Series(user_id).duplicated().to_numpy(), "user_id appears twice", user_id)
    _first_bad(path, (age < 1) | (age > 120), "age must be in 1..120", age)
    gender = fields["gender"].to_numpy(dtype=object)
    _first_bad(path, ~np.isin(gender, ["M", "F"]), "gender must be M or F", gender)
    occupation = fields["occupation"].to_numpy(dtype=object)
    if occupation_path.is_file():  # the lookup table ships with the data; check against it if present
        known = [o for o in occupation_path.read_text(encoding="latin-1").split() if o]
        _first_bad(path, ~np.isin(occupation, known), "occupation is not listed in u.occupation", occupation)
    return pd.DataFrame({
        "user_id": user_id, "age": age, "gender": gender, "occupation": occupation,
        "zip": fields["zip"].to_numpy(dtype=object),
    }).sort_values("user_id", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- Amazon Beauty

def load_amazon_beauty(root: Path) -> Dataset:
    """Amazon Beauty (S3-Rec preprocessing) from `root/amazon-s3rec`.

    Beauty.txt holds one user per line, `user item item ...`, items in time order. There are no
    timestamps: `timestamp` is the item's position in the user's sequence (0, 1, 2, ...), so the
    order and leave-last-out are right, but a time split cuts by position, not by date.
    Items: item_id, attributes (list of attribute ids from Beauty_item2attributes.json).
    """
    folder = Path(root) / BEAUTY_DIR
    hint = _ROOT_HINT.format(folder=BEAUTY_DIR)
    items = _beauty_items(_require(folder / "Beauty_item2attributes.json", hint))

    path = _require(folder / "Beauty.txt", hint)
    users, item_chunks, seen = [], [], set()
    # A plain loop: 22k short lines parse in ~0.1 s, and each problem has its line at hand.
    text = path.read_text(encoding="latin-1")  # never fails: a stray byte shows up as a bad token
    for lineno, line in enumerate(text.split("\n"), start=1):
        tokens = line.split()
        if not tokens:
            continue  # blank lines (the trailing newline) carry no user
        try:
            ids = [int(t) for t in tokens]
        except ValueError:
            bad = next(t for t in tokens if not re.fullmatch(r"[+-]?[0-9]+", t))
            raise _error(path, lineno, f"{bad!r} is not an integer id", _FIX_LINE) from None
        if len(ids) < 2:
            raise _error(path, lineno, f"user {ids[0]} has no items (expected 'user item item ...')",
                         _FIX_LINE)
        if ids[0] in seen:
            raise _error(path, lineno, f"user {ids[0]} appears on two lines", "merge the two sequences")
        seen.add(ids[0])
        users.append((ids[0], len(ids) - 1, lineno))
        item_chunks.append(ids[1:])
    if not users:
        raise _error(path, None, "no user sequences", "restore the original file")

    user_id, length, line_of = np.array(users, dtype=np.int64).T
    item = np.fromiter((i for chunk in item_chunks for i in chunk), dtype=np.int64,
                       count=int(length.sum()))
    user = np.repeat(user_id, length)
    position = np.arange(len(item)) - np.repeat(np.cumsum(length) - length, length)  # 0..len-1 per user
    unknown = np.flatnonzero(~np.isin(item, items["item_id"].to_numpy()))
    if len(unknown):
        k = int(np.searchsorted(np.cumsum(length), unknown[0], side="right"))  # which user line
        raise _error(path, int(line_of[k]), f"item {item[unknown[0]]} has no entry in "
                     "Beauty_item2attributes.json", "use the two files of the same release")
    return Dataset("amazon-beauty", _canonical(user, item, position), items, None)


def _beauty_items(path: Path) -> pd.DataFrame:
    try:
        raw = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise _error(path, exc.lineno, f"not valid JSON ({exc.msg}, column {exc.colno})",
                     "restore the original file") from None
    except UnicodeDecodeError as exc:
        raise _error(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})",
                     "restore the original file") from None
    if not isinstance(raw, dict):
        raise _error(path, None, "expected a JSON object {item_id: [attribute ids]}",
                     "restore the original file")
    ids, attrs = [], []
    for key, value in raw.items():
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", key):
            raise _error(path, None, f"key {key!r} is not an integer item id", "fix that entry")
        if not isinstance(value, list) or not all(type(a) is int for a in value):  # bool is not an id
            raise _error(path, None, f"item {key}: attributes must be a list of integers, got {value!r}",
                         "fix that entry")
        ids.append(int(key))
        attrs.append(value)
    items = pd.DataFrame({"item_id": np.asarray(ids, dtype=np.int64), "attributes": attrs})
    return items.sort_values("item_id", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- generic logs

GENERIC_REQUIRED = ("user_id", "item_id", "timestamp")
GENERIC_OPTIONAL = ("rating", "play_duration", "item_duration", "label")


def load_generic(path: Path) -> Dataset:
    """Any interaction log as CSV (with a header line) or parquet.

    Required columns: user_id, item_id (integers), timestamp (unix seconds, integer >= 0; a
    parquet datetime column is converted). Optional: rating, label (finite numbers),
    play_duration, item_duration (seconds, finite, >= 0). Empty cells in optional columns mean
    "absent" (NaN). Other columns are ignored. CSV line numbers assume one record per line
    (no quoted newlines). Items: item_id, plus item_duration (the median over its events)
    when that column is present. No users table.
    """
    path = Path(path)
    _require(path, "set data.path (relative to data.root / ONEREC_DATA_ROOT, or absolute)")
    known = GENERIC_REQUIRED + GENERIC_OPTIONAL
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # skip_blank_lines=False keeps row i on line i + 2 (line 1 is the header).
        try:
            df = pd.read_csv(path, skip_blank_lines=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise _error(path, None, f"cannot parse as CSV: {exc}", "fix the file") from None
        except pd.errors.EmptyDataError:
            raise _error(path, None, "the file is empty", "add a header line and rows") from None
        df.columns = [str(c).strip() for c in df.columns]
        offset, unit = 2, "line"
    elif suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise _error(path, None, f"cannot read as parquet: {exc}",
                         "fix or re-export the file") from None
        offset, unit = 1, "row"
    else:
        raise _error(path, None, f"unsupported file type '{path.suffix}'",
                     "use a .csv (with a header line) or .parquet file")

    missing = [c for c in GENERIC_REQUIRED if c not in df.columns]
    if missing:
        raise _error(path, None, f"missing required column(s) {', '.join(missing)} "
                     f"(found: {', '.join(map(str, df.columns)) or 'none'})",
                     f"the generic format needs {', '.join(GENERIC_REQUIRED)}")
    df = df[[c for c in known if c in df.columns]]  # other columns are ignored
    if len(df) == 0:
        raise _error(path, None, "no interactions", "add rows after the header")

    def where(bad, problem, values, todo=_FIX_LINE):
        _first_bad(path, bad, problem, values, line_offset=offset, unit=unit, todo=todo)

    def integers(name: str) -> np.ndarray:
        raw = df[name]
        if pd.api.types.is_datetime64_any_dtype(raw):
            epoch = pd.Timestamp(0, tz="UTC")
            raw = (pd.to_datetime(raw, utc=True) - epoch) // pd.Timedelta(seconds=1)
        num = pd.to_numeric(raw, errors="coerce")
        f = num.to_numpy(dtype=np.float64, na_value=np.nan)
        where(~np.isfinite(f) | (f != np.floor(f)), f"{name} must be an integer",
              np.where(raw.isna(), "<empty>", raw.astype(str)).astype(object))
        return num.to_numpy().astype(np.int64)

    def numbers(name: str, non_negative: bool) -> np.ndarray | None:
        if name not in df.columns:
            return None
        raw = df[name]
        f = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        shown = raw.astype(str).to_numpy(dtype=object)
        where(np.isnan(f) & raw.notna().to_numpy(), f"{name} must be a number", shown)
        where(np.isinf(f), f"{name} must be finite", shown)
        if non_negative:
            where(f < 0, f"{name} must be >= 0 seconds", shown)
        return f

    user, item, ts = integers("user_id"), integers("item_id"), integers("timestamp")
    where(ts < 0, "timestamp must be >= 0 (unix seconds)", ts)
    optional = {name: numbers(name, non_negative=name.endswith("duration"))
                for name in GENERIC_OPTIONAL}
    interactions = _canonical(user, item, ts, **optional)

    items = pd.DataFrame({"item_id": np.unique(item)})
    if optional["item_duration"] is not None:
        median = interactions.groupby("item_id")["item_duration"].median().astype(np.float32)
        items["item_duration"] = items["item_id"].map(median).to_numpy(dtype=np.float32)
    return Dataset("generic", interactions, items, None)


# --------------------------------------------------------------------------- dispatch

def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg.dataset` from `cfg.root_path()`, keeping the `cfg.max_users` smallest user ids
    when that is > 0 (the items table keeps the whole catalogue)."""
    root = cfg.root_path()
    if cfg.dataset == "ml-100k":
        ds = load_movielens_100k(root)
    elif cfg.dataset == "amazon-beauty":
        ds = load_amazon_beauty(root)
    elif cfg.dataset == "generic":
        path = Path(cfg.path)
        ds = load_generic(path if path.is_absolute() else root / path)
    else:
        raise DataError(f"data.dataset: unknown data set '{cfg.dataset}'; "
                        "choose ml-100k, amazon-beauty or generic")
    if cfg.max_users > 0:
        keep = np.unique(ds.interactions["user_id"].to_numpy())[: cfg.max_users]
        inter = ds.interactions[ds.interactions["user_id"].isin(keep)].reset_index(drop=True)
        users = None if ds.users is None else ds.users[ds.users["user_id"].isin(keep)].reset_index(drop=True)
        ds = Dataset(ds.name, inter, ds.items, users)
    return ds
