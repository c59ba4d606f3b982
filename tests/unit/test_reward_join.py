"""The reward join's edge cases: late, duplicate, unmatched, out of order, the latest wins."""
from __future__ import annotations

import pytest

from onerec.data.events import UserEvent
from onerec.rl.rewards import DurationShaper
from onerec.stream.rewards import RewardJoin, event_reward

W = 1_000


def exposure(request_id="r1", user=7, items=(10, 11, 12), t=0):
    return {"schema_version": 1, "request_id": request_id, "user_id": user, "variant": "control",
            "model_version": "2", "fallback": None, "time_ms": t,
            "items": [{"item_id": i, "position": p, "score": 0.0} for p, i in enumerate(items)]}


def rate(item, rating, request_id="r1", user=7, t=10, event_id=None):
    return UserEvent(event_id or f"{request_id}-{item}-{t}", user, item, "rate", 1_000_000_000_000 + t,
                     rating=rating, request_id=request_id)


def test_reactions_in_the_window_become_per_item_rewards():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0)
    join.add_reaction(rate(10, 5.0), now_ms=100)
    join.add_reaction(rate(12, 1.0), now_ms=200)
    assert join.close(now_ms=W - 1) == []                      # still open
    (row,) = join.close(now_ms=W)
    assert row.rewards == [1.0, None, -1.0] and row.reward == 0.0 and row.items == [10, 11, 12]
    assert row.as_dict()["reacted"] == 2 and join.stats["matched"] == 2 and join.stats["rows"] == 1


def test_a_reaction_before_its_exposure_waits_for_it():
    join = RewardJoin(W)
    join.add_reaction(rate(11, 4.0), now_ms=0)
    join.add_exposure(exposure(), now_ms=50)
    (row,) = join.drain()
    assert row.rewards == [None, 0.5, None] and join.stats["unmatched"] == 0


def test_late_duplicate_unmatched_and_organic_events_are_counted_not_applied():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0)
    join.add_reaction(rate(10, 5.0, event_id="e1"), now_ms=10)
    join.add_reaction(rate(10, 1.0, event_id="e1"), now_ms=20)          # the same event again
    join.add_reaction(rate(99, 5.0), now_ms=30)                         # an item not served
    join.add_reaction(rate(11, 5.0, user=8), now_ms=40)                 # someone else's reaction
    join.add_reaction(UserEvent("o1", 7, 10, "rate", 1_000_000_000_000, rating=5.0), now_ms=50)  # no request id
    join.add_reaction(rate(12, 5.0, request_id="nobody"), now_ms=60)    # an exposure never seen
    (row,) = join.close(now_ms=W)
    join.add_reaction(rate(11, 5.0, t=700), now_ms=W + 10)              # after the window
    join.add_exposure(exposure(), now_ms=W + 20)                        # a redelivered exposure
    join.close(now_ms=2 * W + 100)
    assert row.rewards == [1.0, None, None]
    s = join.stats
    assert (s["duplicate_reactions"], s["unmatched"], s["organic"], s["late"], s["duplicate_exposures"]) == (1, 3, 1, 1, 1)


def test_the_latest_reaction_to_an_item_wins_whatever_the_arrival_order():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0)
    join.add_reaction(rate(10, 1.0, t=500), now_ms=10)
    join.add_reaction(rate(10, 5.0, t=100), now_ms=20)                  # older, arrived later
    (row,) = join.drain()
    assert row.rewards[0] == -1.0


def test_closed_ids_are_forgotten_after_ten_windows():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0)
    join.close(now_ms=W)
    join.close(now_ms=12 * W)
    assert "r1" not in join.closed


def test_event_rewards_by_type():
    base = dict(event_id="e", user_id=1, item_id=2, event_time_ms=1_000_000_000_000, request_id="r")
    assert event_reward(UserEvent(event_type="rate", rating=5.0, **base)) == 1.0
    assert event_reward(UserEvent(event_type="like", **base)) == 1.0
    assert event_reward(UserEvent(event_type="skip", **base)) == -1.0
    assert event_reward(UserEvent(event_type="impression", **base)) is None
    play = UserEvent(event_type="play", play_duration_s=50.0, item_duration_s=60.0, **base)
    assert event_reward(play) is None                                   # no shaper: unshaped
    shaper = DurationShaper.fit([60, 60, 60, 60], [5, 10, 20, 50])
    assert event_reward(play, shaper) == 1.0


def test_a_play_without_a_shaper_is_counted_unshaped():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0)
    join.add_reaction(UserEvent("p", 7, 10, "play", 1_000_000_000_000, play_duration_s=3.0, request_id="r1"), now_ms=5)
    (row,) = join.drain()
    assert row.rewards == [None, None, None] and join.stats["unshaped_plays"] == 1


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window_ms"):
        RewardJoin(0)


def test_pending_tokens_are_the_records_still_only_in_memory():
    join = RewardJoin(W)
    join.add_exposure(exposure(), now_ms=0, token=("exposures", 0, 5))
    join.add_reaction(rate(10, 5.0), now_ms=10, token=("user-events", 1, 40))
    join.add_reaction(rate(10, 5.0, request_id="r2"), now_ms=20, token=("user-events", 0, 7))   # waiting
    join.add_reaction(UserEvent("o", 7, 10, "click", 1_000_000_000_000), now_ms=30, token=("user-events", 0, 8))
    assert sorted(join.pending_tokens()) == [("exposures", 0, 5), ("user-events", 0, 7), ("user-events", 1, 40)]
    join.close(now_ms=W)
    assert list(join.pending_tokens()) == [("user-events", 0, 7)]
    join.close(now_ms=W + 30)
    assert list(join.pending_tokens()) == []


def test_a_row_carries_the_experiment_latency_and_the_watch_time_of_its_latest_plays():
    join = RewardJoin(W)
    join.add_exposure({**exposure(), "experiment": "exp-1", "latency_ms": 12.5}, now_ms=0)

    def play(item, seconds, t):
        return UserEvent(f"p-{item}-{t}", 7, item, "play", 1_000_000_000_000 + t, play_duration_s=seconds,
                         request_id="r1")

    join.add_reaction(play(10, 30.0, t=20), now_ms=10)
    join.add_reaction(play(10, 5.0, t=10), now_ms=20)            # an older play of the same item arrives later
    join.add_reaction(play(12, 7.5, t=30), now_ms=30)
    (row,) = join.close(now_ms=W)
    assert (row.experiment, row.latency_ms, row.watch_s) == ("exp-1", 12.5, 37.5)
    join.add_exposure({**exposure("r2"), "experiment": ""}, now_ms=W)   # '' = no experiment running
    (plain,) = join.drain()
    assert (plain.experiment, plain.latency_ms, plain.watch_s) == (None, None, 0.0)


@pytest.mark.parametrize("change", [{"experiment": 3}, {"latency_ms": "fast"}, {"latency_ms": True}])
def test_an_exposure_with_a_bad_experiment_or_latency_is_refused(change):
    import json

    from onerec.stream.rewards import parse_exposure

    assert parse_exposure(json.dumps({**exposure(), "experiment": "e", "latency_ms": 3.0}).encode())["experiment"] == "e"
    with pytest.raises(ValueError, match="experiment must be a string and latency_ms a number"):
        parse_exposure(json.dumps({**exposure(), **change}).encode())
