"""Data: loaders for the shared data sets, the canonical interactions table, splits, summaries."""
from onerec.data.describe import describe, format_table
from onerec.data.loaders import (DataError, Dataset, load_amazon_beauty, load_dataset, load_generic,
                                 load_movielens_100k)
from onerec.data.splits import LeaveLastOut, TimeSplit, leave_last_out, online_split, time_split

__all__ = [
    "DataError", "Dataset", "load_dataset", "load_movielens_100k", "load_amazon_beauty", "load_generic",
    "leave_last_out", "online_split", "time_split", "LeaveLastOut", "TimeSplit", "describe", "format_table",
]
