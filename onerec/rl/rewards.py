"""Reactions -> rewards.

Explicit ratings (MovieLens, `rate` events): reward = (rating - neutral) / (max - neutral), so 5
stars -> +1, the neutral rating -> 0, 1 star -> -1 with the defaults (neutral 3, scale 1..5).

Watch time (`play` events), OneRec-V2's duration-aware shaping: raw play time favours long items,
so items are bucketed by length, bucket = floor(log_beta(item duration)), and an exposure's
reward is the quantile of its play time among the plays of its bucket: comparable across lengths.
The top quartile (quantile >= 0.75) is a positive (+1), a negative reaction (a skip, or a play
of zero seconds) is -1, anything else 0 (`DurationShaper.reward`); `quantile` gives the
continuous value. Plays of items of unknown length share one bucket of their own; a bucket
never seen when fitting falls back to all the plays.

    shaper = DurationShaper.fit(item_durations_s, play_durations_s, beta=2.0)
    shaper.quantile(item_duration_s=300, play_duration_s=240)   # -> 0.81
    shaper.reward(300, 240)                                     # -> 1.0
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNKNOWN_LENGTH = -(2**31)        # the bucket of plays whose item duration is missing or zero
ALL_PLAYS = None                 # the fallback distribution's key
TOP_QUARTILE = 0.75


def rating_reward(rating: float, neutral: float = 3.0, top: float = 5.0) -> float:
    """Explicit rating -> reward in [-1, 1] for ratings in [2 * neutral - top, top]."""
    if not math.isfinite(rating):
        raise ValueError(f"rating must be finite, got {rating!r}")
    return max(-1.0, min(1.0, (rating - neutral) / (top - neutral)))


def length_bucket(item_duration_s: float | None, beta: float) -> int:
    """floor(log_beta(duration)); UNKNOWN_LENGTH for a missing, zero or negative duration."""
    if item_duration_s is None or not item_duration_s > 0 or not math.isfinite(item_duration_s):
        return UNKNOWN_LENGTH
    return math.floor(math.log(item_duration_s) / math.log(beta))


@dataclass(frozen=True)
class DurationShaper:
    beta: float
    plays: dict                  # bucket (or ALL_PLAYS) -> sorted np.ndarray of play seconds

    @classmethod
    def fit(cls, item_durations_s: Sequence[float | None], play_durations_s: Sequence[float],
            beta: float = 2.0) -> DurationShaper:
        if not beta > 1:
            raise ValueError(f"beta must be > 1, got {beta}")
        if len(item_durations_s) != len(play_durations_s) or not len(play_durations_s):
            raise ValueError("fit needs as many item durations as play durations, at least one")
        plays = np.asarray(play_durations_s, dtype=float)
        if not np.isfinite(plays).all() or (plays < 0).any():
            raise ValueError("play durations must be finite and >= 0")
        buckets = np.array([length_bucket(d, beta) for d in item_durations_s])
        by_bucket = {int(b): np.sort(plays[buckets == b]) for b in np.unique(buckets)}
        return cls(beta, {**by_bucket, ALL_PLAYS: np.sort(plays)})

    def quantile(self, item_duration_s: float | None, play_duration_s: float) -> float:
        """The share of the bucket's plays at or below this one, in [0, 1] (ties count half)."""
        ref = self.plays.get(length_bucket(item_duration_s, self.beta))
        ref = self.plays[ALL_PLAYS] if ref is None else ref
        below = np.searchsorted(ref, play_duration_s, side="left")
        at_or_below = np.searchsorted(ref, play_duration_s, side="right")
        return float((below + at_or_below) / 2 / len(ref))

    def reward(self, item_duration_s: float | None, play_duration_s: float | None,
               negative: bool = False) -> float:
        """+1 top quartile of the bucket, -1 a negative reaction or no play at all, else 0."""
        if negative or not play_duration_s:
            return -1.0
        return 1.0 if self.quantile(item_duration_s, play_duration_s) >= TOP_QUARTILE else 0.0
