"""The user-event schema: one JSON object per Kafka record on the user-events topic.

Producers (the dataset replayer, real clients) send `event.to_json()`; the ingestor calls
`parse_event(record.value)` and sends whatever raises `EventValidationError` to the DLQ with
`dlq_headers(err)`, so every rejected record says why. Validation is strict (unknown fields,
wrong types, out-of-range values are errors, never coerced): a silently "fixed" event would
poison features and rewards downstream. The standard library defines what is valid
(`parse_event_reference`); orjson makes the common case fast.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import orjson

SCHEMA_VERSION = 1  # bump on any incompatible change; readers reject versions newer than theirs

EVENT_TYPES = (
    "impression",  # the item was shown to the user (reactions point back via request_id)
    "click",       # the user opened the item
    "play",        # the user watched it; carries play_duration_s (required), item_duration_s if known
    "like",        # explicit positive feedback
    "share",       # the user shared the item
    "skip",        # the user swiped away; play_duration_s (optional) = time before skipping
    "rate",        # explicit rating; carries rating 1..5 (required here, rejected on other types)
)

MIN_EVENT_TIME_MS = 631_152_000_000    # 1990-01-01T00:00:00Z; the replayed MovieLens data is from 1997
MAX_FUTURE_SKEW_MS = 86_400_000        # client clocks run ahead, but not by more than a day
MAX_EVENT_BYTES = 16 * 1024            # an event is a few hundred bytes; bulk data does not belong here
MAX_DURATION_S = 7 * 86_400.0
MAX_INT64 = 2**63 - 1                  # ids and context ints are int64 downstream (Feast, parquet)
MAX_ID_CHARS = 128
MAX_CONTEXT_KEYS, MAX_CONTEXT_KEY_CHARS, MAX_CONTEXT_STR_CHARS = 16, 64, 256

# DLQ reason codes: stable, so dashboards and alerts can count them.
REASONS = ("too_large", "malformed_json", "not_an_object", "unsupported_version", "unknown_field",
           "missing_field", "wrong_type", "not_finite", "out_of_range", "bad_format",
           "bad_event_type", "field_not_allowed")


class EventValidationError(ValueError):
    """An event broke the schema: `reason` is one of REASONS, `field` a top-level field or None."""

    def __init__(self, reason: str, field: str | None, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.reason, self.field, self.message = reason, field, message

    def __reduce__(self):  # picklable (worker processes) despite the custom __init__
        return type(self), (self.reason, self.field, self.message)


@dataclass(frozen=True, slots=True)
class UserEvent:
    """One user event. Construction does not validate (trusted code stays cheap): see `validate`."""
    event_id: str                          # unique per event: 1..128 printable chars, no whitespace
    user_id: int                           # raw id, 0 <= id < 2**63
    item_id: int                           # raw id, never a semantic ID (those belong to a model version)
    event_type: str                        # one of EVENT_TYPES
    event_time_ms: int                     # unix epoch milliseconds, when the user acted
    play_duration_s: float | None = None   # seconds played, 0..7 days
    item_duration_s: float | None = None   # the item's length in seconds, (0, 7 days]
    rating: float | None = None            # 1..5, "rate" events only
    request_id: str | None = None          # the recommendation request this reacts to (rules of event_id)
    # hash=False: a dict is unhashable, and events should still work in dedup sets
    context: dict[str, str | int | float | bool] | None = field(default=None, hash=False)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        """A JSON-ready dict without the None optional fields (context is a copy)."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES if getattr(self, name) is not None}
        if "context" in d:
            d["context"] = {**d["context"]}
        return d

    def to_json(self) -> bytes:
        """Compact canonical bytes (sorted keys, ASCII); `parse_event(e.to_json()) == e`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True,
                          allow_nan=False).encode("ascii")


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(UserEvent))
_KNOWN = frozenset(_FIELD_NAMES)
_REQUIRED = ("event_id", "user_id", "item_id", "event_type", "event_time_ms", "schema_version")
_KNOWN_REQUIRED = frozenset(_REQUIRED)


def parse_event(raw: bytes | bytearray | str, now_ms: int | None = None) -> UserEvent:
    """Decode one record value and validate it; raises EventValidationError."""
    _check_size(raw)
    # Fast path: orjson decodes a valid event in a third of the stdlib's time (a tenth of the
    # ingestor's per-event budget). It only ever accepts: anything it rejects or decodes
    # differently from the stdlib goes through `parse_event_reference`, which decides (and words
    # the error). orjson rejects NaN/Infinity literals, lone surrogates and deep nesting (the
    # stdlib path then handles them), and decodes integers beyond 64 bits as floats: those can
    # only pass validation as context values, so a context float of |x| >= 2**63 takes that path.
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms  # one clock for both paths
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return parse_event_reference(raw, now_ms)
    try:
        event = event_from_dict(d, now_ms)
    except EventValidationError:
        return parse_event_reference(raw, now_ms)
    if event.context and any(type(v) is float and abs(v) >= 2.0**63 for v in event.context.values()):
        return parse_event_reference(raw, now_ms)
    return event


def parse_event_reference(raw: bytes | bytearray | str, now_ms: int | None = None) -> UserEvent:
    """`parse_event` with the standard library's decoder alone: the definition of what is valid."""
    _check_size(raw)
    try:
        # UTF-8 only (RFC 8259 for JSON on the wire), decoded here: json.loads(bytes) would spend
        # a fifth of the time sniffing for UTF-16/32. NaN/Infinity literals decode to floats and
        # fail the field checks, which can then name the field.
        d = json.loads(raw if isinstance(raw, str) else str(raw, "utf-8"))
    except RecursionError:
        raise EventValidationError("malformed_json", None, "not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise EventValidationError("malformed_json", None, f"not valid JSON: {e}") from None
    return event_from_dict(d, now_ms)


def _check_size(raw: bytes | bytearray | str) -> None:
    """Before decoding, so an oversize payload costs nothing; a str counts as its UTF-8 bytes.
    A str of at most a quarter of the limit in characters fits (UTF-8 takes at most 4 bytes each)."""
    if len(raw) <= MAX_EVENT_BYTES // 4:
        return
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > MAX_EVENT_BYTES:
        raise EventValidationError("too_large", None, f"payload is {size} bytes (limit {MAX_EVENT_BYTES})")


def event_from_dict(d: dict, now_ms: int | None = None) -> UserEvent:
    """The validation core: check a decoded JSON object strictly and build the event."""
    if type(d) is not dict:
        raise EventValidationError("not_an_object", None, f"the event is {_kind(d)} (must be a JSON object)")
    # The version first: a newer producer's new fields are a version problem, not unknown fields.
    if "schema_version" not in d:
        raise _missing("schema_version", f"every event names its schema; this reader knows {SCHEMA_VERSION}")
    if not 1 <= (version := _int(d, "schema_version", -MAX_INT64, MAX_INT64)) <= SCHEMA_VERSION:
        raise EventValidationError("unsupported_version", "schema_version", f"{version} is not supported "
                                   f"(this reader knows 1..{SCHEMA_VERSION}; newer needs a newer consumer)")
    if not _KNOWN.issuperset(d):  # (cheaper than building the set difference on every event)
        name = str(min((k for k in d if k not in _KNOWN), key=str))[:MAX_CONTEXT_KEY_CHARS]  # stable
        raise EventValidationError("unknown_field", name,
                                   f"not a field of schema v{SCHEMA_VERSION} ({', '.join(_FIELD_NAMES)})")
    if not _KNOWN_REQUIRED <= d.keys():
        raise _missing(next(n for n in _REQUIRED if n not in d), "a required field")

    event_type = d["event_type"]
    if type(event_type) is not str:
        raise _wrong_type("event_type", event_type, "a string")
    if event_type not in EVENT_TYPES:
        raise EventValidationError("bad_event_type", "event_type",
                                   f"{_show(event_type)} is not one of {', '.join(EVENT_TYPES)}")
    rating = _float(d, "rating", 1.0, 5.0)
    if rating is None and event_type == "rate":
        raise _missing("rating", 'required on "rate" events')
    if rating is not None and event_type != "rate":
        raise EventValidationError("field_not_allowed", "rating", f'{_show(d["rating"])} on a '
                                   f'"{event_type}" event (only "rate" events carry a rating)')
    play_duration_s = _float(d, "play_duration_s", 0.0, MAX_DURATION_S)
    if play_duration_s is None and event_type == "play":
        raise _missing("play_duration_s", 'required on "play" events')

    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    event_time_ms = _int(d, "event_time_ms", -MAX_INT64, MAX_INT64)
    if event_time_ms < MIN_EVENT_TIME_MS:
        seconds = event_time_ms * 1000 >= MIN_EVENT_TIME_MS
        raise _out_of_range("event_time_ms", event_time_ms, f">= {MIN_EVENT_TIME_MS}, unix epoch milliseconds"
                            + ("; this looks like seconds" if seconds else ""), "is before 1990")
    if event_time_ms > now_ms + MAX_FUTURE_SKEW_MS:
        days = (event_time_ms - now_ms) / 86_400_000
        raise _out_of_range("event_time_ms", event_time_ms, "at most 1 day ahead; check the producer's clock",
                            f"is {days:.1f} days in the future")

    return UserEvent(
        event_id=_string_id(d, "event_id"),
        user_id=_int(d, "user_id", 0, MAX_INT64),
        item_id=_int(d, "item_id", 0, MAX_INT64),
        event_type=event_type,
        event_time_ms=event_time_ms,
        play_duration_s=play_duration_s,
        item_duration_s=_float(d, "item_duration_s", 0.0, MAX_DURATION_S, above_lo=True),
        rating=rating,
        request_id=_string_id(d, "request_id"),
        context=_context(d.get("context")),
    )


def validate(event: UserEvent, now_ms: int | None = None) -> UserEvent:
    """Check an event built by code (e.g. the replayer) before sending; returns it normalized."""
    return event_from_dict(event.to_dict(), now_ms)


def dlq_headers(err: EventValidationError) -> list[tuple[str, bytes]]:
    """Kafka record headers for the DLQ copy of a rejected record, so it carries the reason."""
    return [("dlq.reason", err.reason.encode()),
            ("dlq.field", (err.field or "").encode("utf-8", "backslashreplace")),
            ("dlq.message", str(err).encode("utf-8", "backslashreplace")),
            ("dlq.schema_version", str(SCHEMA_VERSION).encode())]


# --- field checks: each returns the clean value or raises ---

def _int(d: dict, name: str, lo: int, hi: int) -> int:
    v = d[name]
    if type(v) is not int:  # `type is`, not isinstance: bools and integral floats are not ids
        raise _wrong_type(name, v, "an integer")
    if not lo <= v <= hi:
        raise _out_of_range(name, v, f"{lo} <= x <= {hi}")
    return v


def _float(d: dict, name: str, lo: float, hi: float, above_lo: bool = False) -> float | None:
    """An optional number; ints are accepted and become floats."""
    v = d.get(name)
    if v is None:
        return None
    if type(v) is float:
        if not math.isfinite(v):
            raise EventValidationError("not_finite", name, f"{_show(v)} is not a finite number")
    elif type(v) is not int:
        raise _wrong_type(name, v, "a number")
    if v < lo or (above_lo and v == lo):
        rule = f"{'>' if above_lo else '>='} {lo:g}"
        raise _out_of_range(name, v, rule, "is negative" if v < 0 else "is too small")
    if v > hi:
        raise _out_of_range(name, v, f"<= {hi:g}")
    return float(v)


def _string_id(d: dict, name: str) -> str | None:
    v = d.get(name)
    if v is None and name not in _REQUIRED:
        return None
    if type(v) is not str:
        raise _wrong_type(name, v, "a string")
    if not 1 <= len(v) <= MAX_ID_CHARS:
        raise _out_of_range(name, v, f"1..{MAX_ID_CHARS} characters", f"is {len(v)} characters")
    if not v.isprintable() or " " in v:  # isprintable() already excludes all whitespace but " "
        raise EventValidationError("bad_format", name,
                                   f"{_show(v)} has whitespace or non-printable characters")
    return v


def _context(v: object) -> dict | None:
    if v is None:
        return None
    if type(v) is not dict:
        raise _wrong_type("context", v, "an object of string keys to scalar values")
    if len(v) > MAX_CONTEXT_KEYS:
        raise _out_of_range("context", v, f"at most {MAX_CONTEXT_KEYS} keys", f"has {len(v)} keys")
    for k, x in v.items():
        t = type(x)
        if type(k) is not str or not 1 <= len(k) <= MAX_CONTEXT_KEY_CHARS:
            bad = "out_of_range", f"key {_show(k)} must be a string of 1..{MAX_CONTEXT_KEY_CHARS} characters"
        elif t not in (str, int, float, bool):  # flat on purpose: context becomes feature columns
            bad = "wrong_type", f"value of {k!r} is {_kind(x)} (must be a string, number or bool)"
        elif t is str and len(x) > MAX_CONTEXT_STR_CHARS:
            bad = "out_of_range", f"value of {k!r} has {len(x)} characters (max {MAX_CONTEXT_STR_CHARS})"
        elif t is float and not math.isfinite(x):
            bad = "not_finite", f"value of {k!r} is {_show(x)}, not a finite number"
        elif t is int and not -MAX_INT64 - 1 <= x <= MAX_INT64:
            bad = "out_of_range", f"value of {k!r} does not fit in int64"
        else:
            continue
        raise EventValidationError(bad[0], "context", bad[1])
    return {**v}


# --- messages read "<field>: <value> <problem> (must be <rule>)" ---

def _show(v: object) -> str:
    """The value as the producer sent it (JSON), cut short so DLQ headers stay small."""
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _kind(v: object) -> str:
    return {bool: "a bool", int: "an integer", float: "a float", str: "a string", dict: "an object",
            list: "an array", type(None): "null"}.get(type(v), f"a Python {type(v).__name__}")


def _wrong_type(name: str, v: object, expected: str) -> EventValidationError:
    return EventValidationError("wrong_type", name, f"{_show(v)} is {_kind(v)} (must be {expected})")


def _out_of_range(name: str, v: object, rule: str, problem: str = "is out of range") -> EventValidationError:
    return EventValidationError("out_of_range", name, f"{_show(v)} {problem} (must be {rule})")


def _missing(name: str, why: str) -> EventValidationError:
    return EventValidationError("missing_field", name, f"missing ({why})")
