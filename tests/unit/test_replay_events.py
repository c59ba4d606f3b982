import numpy as np
import pandas as pd

from onerec.data.events import parse_event
from onerec.stream.replay import interaction_events


def _interactions(rows):
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating", "play_duration",
                                     "item_duration", "label"])
    return df.astype({"user_id": "int64", "item_id": "int64", "timestamp": "int64"})


def test_events_are_valid_typed_and_stably_identified():
    nan = np.nan
    df = _interactions([
        (1, 10, 900_000_000, 4.0, nan, nan, nan),
        (1, 11, 900_000_005, nan, 30.0, 120.0, nan),
        (2, 10, 900_000_009, nan, nan, nan, nan),
        (2, 10, 900_000_009, nan, nan, nan, nan),   # same user, item and second: a second event
    ])
    events = list(interaction_events(df, "toy"))
    assert [e.event_type for e in events] == ["rate", "play", "click", "click"]
    assert [e.event_id for e in events] == ["toy:1:10:900000000", "toy:1:11:900000005",
                                            "toy:2:10:900000009", "toy:2:10:900000009:1"]
    assert events[0].rating == 4.0 and events[0].event_time_ms == 900_000_000_000
    assert events[1].play_duration_s == 30.0 and events[1].item_duration_s == 120.0
    assert [parse_event(e.to_json()) for e in events] == events
    assert [e.event_id for e in interaction_events(df, "toy")] == [e.event_id for e in events]


def test_real_live_stream_converts_without_loss(debug_config):
    from onerec.data import load_dataset, time_split

    live = time_split(load_dataset(debug_config.data).interactions, 0.2).live
    events = list(interaction_events(live, "ml-100k"))
    assert len(events) == len(live) and len({e.event_id for e in events}) == len(live)
    assert all(e.event_type == "rate" and 1 <= e.rating <= 5 for e in events)
