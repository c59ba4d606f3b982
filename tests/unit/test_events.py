"""The user-event schema: what it accepts, what it rejects (with which reason), round trips."""
import json
import math
import pickle
import random

import pytest

from onerec.data.events import (EVENT_TYPES, MAX_EVENT_BYTES, MIN_EVENT_TIME_MS, REASONS, SCHEMA_VERSION,
                                EventValidationError, UserEvent, dlq_headers, event_from_dict, parse_event,
                                parse_event_reference, validate)

NOW_MS = 1_700_000_000_000  # a fixed "now" so time checks never depend on the clock
DAY_MS = 86_400_000
T_1997 = 880_000_000_000

MINIMAL = {"schema_version": 1, "event_id": "e-1", "user_id": 7, "item_id": 42,
           "event_type": "click", "event_time_ms": T_1997}
REQUIRED = list(MINIMAL)


def parse(d, now_ms=NOW_MS):
    return parse_event(json.dumps(d), now_ms=now_ms)


def rejected(raw, reason, field):
    """Parse `raw` (a dict is sent as JSON), expect a rejection, check reason/field, return it."""
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    with pytest.raises(EventValidationError) as info:
        parse_event(raw, now_ms=NOW_MS)
    err = info.value
    assert (err.reason, err.field) == (reason, field), str(err)
    assert err.reason in REASONS
    if field is not None:
        assert str(err).startswith(f"{field}: "), str(err)
    return err


def with_(**changes):
    return {**MINIMAL, **changes}


# --- accepted ---

def test_minimal_event():
    e = parse(MINIMAL)
    assert e == UserEvent("e-1", 7, 42, "click", T_1997)
    assert e.schema_version == SCHEMA_VERSION and e.play_duration_s is None and e.context is None


def test_all_optional_fields():
    d = with_(event_type="play", play_duration_s=12.5, item_duration_s=30.0, request_id="req-9",
              context={"page": "home", "position": 3, "score": 0.25, "autoplay": True})
    e = parse(d)
    assert (e.play_duration_s, e.item_duration_s, e.request_id) == (12.5, 30.0, "req-9")
    assert e.context == {"page": "home", "position": 3, "score": 0.25, "autoplay": True}
    assert e.to_dict() == d


def test_rate_event_with_int_rating():
    e = parse(with_(event_type="rate", rating=4))
    assert e.rating == 4.0 and type(e.rating) is float


def test_ints_accepted_for_float_fields():
    e = parse(with_(event_type="play", play_duration_s=0, item_duration_s=60))
    assert (e.play_duration_s, e.item_duration_s) == (0.0, 60.0)
    assert type(e.play_duration_s) is float


def test_null_optional_fields_mean_absent():
    assert parse(with_(request_id=None, context=None, rating=None)) == parse(MINIMAL)


def test_bytes_and_str_payloads():
    raw = json.dumps(MINIMAL)
    assert parse_event(raw.encode(), now_ms=NOW_MS) == parse_event(raw, now_ms=NOW_MS)


def test_default_now_accepts_a_current_event():
    import time
    parse_event(json.dumps(with_(event_time_ms=int(time.time() * 1000))))


def test_every_event_type():
    for t in EVENT_TYPES:
        extra = {"rating": 3} if t == "rate" else {"play_duration_s": 1.0} if t == "play" else {}
        assert parse(with_(event_type=t, **extra)).event_type == t


def test_validate_checks_code_built_events():
    assert validate(UserEvent("e", 1, 2, "rate", T_1997, rating=5), now_ms=NOW_MS).rating == 5.0
    with pytest.raises(EventValidationError, match="rating"):
        validate(UserEvent("e", 1, 2, "rate", T_1997), now_ms=NOW_MS)


def test_events_are_hashable_even_with_context():
    e = parse(with_(context={"a": 1}))
    assert len({e, parse(with_(context={"a": 1}))}) == 1


# --- round trip ---

def random_event(rng: random.Random) -> UserEvent:
    event_type = rng.choice(EVENT_TYPES)
    maybe = lambda value: value if rng.random() < 0.5 else None  # noqa: E731
    context = maybe({f"k{i}": rng.choice(["x" * rng.randint(0, 256), rng.randint(-2**63, 2**63 - 1),
                                          rng.uniform(-1e9, 1e9), rng.random() < 0.5, "ü✓"])
                     for i in range(rng.randint(0, 16))})
    return UserEvent(
        event_id=f"e{rng.getrandbits(64):x}",
        user_id=rng.randint(0, 2**63 - 1),
        item_id=rng.choice([0, rng.randint(0, 2**63 - 1)]),
        event_type=event_type,
        event_time_ms=rng.randint(MIN_EVENT_TIME_MS, NOW_MS + DAY_MS),
        play_duration_s=rng.uniform(0, 7 * 86400) if event_type == "play" else maybe(rng.uniform(0, 100)),
        item_duration_s=maybe(rng.uniform(1e-3, 7 * 86400)),
        rating=float(rng.randint(1, 5)) if event_type == "rate" else None,
        request_id=maybe("r" + "".join(rng.choices("abcXYZ019-_:/.", k=rng.randint(0, 127)))),
        context=context,
    )


def test_round_trip_many_events():
    rng = random.Random(0)
    for _ in range(1000):
        e = random_event(rng)
        raw = e.to_json()
        assert parse_event(raw, now_ms=NOW_MS) == e
        assert raw == parse_event(raw, now_ms=NOW_MS).to_json()  # canonical bytes


def outcome(parse_fn, raw):
    try:
        return parse_fn(raw, now_ms=NOW_MS)
    except EventValidationError as err:
        return (err.reason, err.field, str(err))


# Payloads where orjson and the standard library decode differently, or where one of them fails.
DECODER_EDGES = [
    json.dumps(with_(context={"big": 2**64})),               # orjson: a float; the stdlib: an int
    json.dumps(with_(context={"big": -2**63 - 1})),
    json.dumps(with_(context={"f": 2.0**63})),               # a real float that large is still valid
    json.dumps(with_(context={"u64": 2**64 - 1})),
    json.dumps(with_(user_id=2**64)),
    json.dumps(with_(user_id=2**64 - 1)),
    json.dumps(with_(item_id=-2**63 - 1)),
    json.dumps(with_(event_time_ms=10**30)),
    json.dumps(with_(event_type="play", play_duration_s=2**70)),
    json.dumps(with_(context={"x": 1})).replace("1}", "1e400}"),  # inf: orjson fails, the stdlib decodes
    json.dumps(with_(context={"x": 1})).replace("1}", "NaN}"),
    json.dumps(with_(event_id="e")).replace('"e"', '"\\ud800"'),   # a lone surrogate escape
    json.dumps(with_(request_id="r")).replace('"r"', '"\\ud83d\\ude00"'),  # a valid pair
    json.dumps(MINIMAL).replace('"e-1"', '"e-1", "event_id": "e-2"'),  # duplicate key: the last wins
    "\ufeff" + json.dumps(MINIMAL),
    b"\xef\xbb\xbf" + json.dumps(MINIMAL).encode(),
    json.dumps(MINIMAL, ensure_ascii=False).replace('"e-1"', '"é-1"'),
    json.dumps(MINIMAL).replace('"e-1"', '"é-1"').encode("utf-8"),
    json.dumps(MINIMAL).replace('"e-1"', '"é-1"').encode("latin-1"),
    bytearray(json.dumps(MINIMAL).encode()),
    "[" * 2000 + "]" * 2000,
    '{"a":' * 2000 + "1" + "}" * 2000,
    json.dumps(MINIMAL) + " \n\t",
    json.dumps(MINIMAL) + " x",
    json.dumps(with_(rating=5)).replace("5", "5.0000000000000000000001"),
    json.dumps(with_(event_type="rate", rating=1)).replace(": 1}", ": 0.99999999999999999999}"),
    "",
    "null",
]


@pytest.mark.parametrize("raw", DECODER_EDGES, ids=range(len(DECODER_EDGES)))
def test_fast_parse_agrees_with_the_reference_on_decoder_edges(raw):
    assert outcome(parse_event, raw) == outcome(parse_event_reference, raw)


def test_fast_parse_agrees_with_the_reference_on_random_events():
    rng = random.Random(1)
    for _ in range(500):
        raw = random_event(rng).to_json()
        mutated = raw.replace(b'"', b"", 1) if rng.random() < 0.2 else raw  # some malformed too
        assert outcome(parse_event, mutated) == outcome(parse_event_reference, mutated)


def test_to_json_is_compact_sorted_and_omits_none():
    raw = parse(MINIMAL).to_json()
    assert b" " not in raw and b"null" not in raw
    assert list(json.loads(raw)) == sorted(MINIMAL)


def test_to_json_never_emits_nan():
    with pytest.raises(ValueError):
        UserEvent("e", 1, 2, "play", T_1997, play_duration_s=math.nan).to_json()


# --- rejected: the envelope ---

def test_malformed_json():
    err = rejected(b'{"event_id": ', "malformed_json", None)
    assert "not valid JSON" in str(err)


def test_invalid_utf8():
    rejected(b'{"event_id": "\xff"}', "malformed_json", None)


def test_deeply_nested_json():
    rejected("[" * 10_000, "malformed_json", None)


def test_json_array():
    err = rejected(json.dumps([MINIMAL]), "not_an_object", None)
    assert "array" in str(err)


def test_event_from_dict_rejects_non_dict():
    with pytest.raises(EventValidationError) as info:
        event_from_dict("nope")
    assert info.value.reason == "not_an_object"


def test_oversize_payload():
    err = rejected(json.dumps(with_(event_id="x" * MAX_EVENT_BYTES)), "too_large", None)
    assert str(MAX_EVENT_BYTES) in str(err)


def test_oversize_counts_utf8_bytes_of_str():
    payload = json.dumps(with_(context={"k": "é" * 200}), ensure_ascii=False)
    payload += " " * (MAX_EVENT_BYTES - len(payload) - 100)  # under the limit in chars, over it in bytes
    rejected(payload, "too_large", None)


@pytest.mark.parametrize("field", [f for f in REQUIRED if f != "schema_version"])
def test_missing_required_field(field):
    d = dict(MINIMAL)
    del d[field]
    rejected(d, "missing_field", field)


def test_missing_schema_version():
    d = dict(MINIMAL)
    del d["schema_version"]
    rejected(d, "missing_field", "schema_version")


def test_unsupported_schema_version():
    err = rejected(with_(schema_version=2, new_field_of_v2=1), "unsupported_version", "schema_version")
    assert "2" in str(err)
    rejected(with_(schema_version=0), "unsupported_version", "schema_version")
    rejected(with_(schema_version="1"), "wrong_type", "schema_version")


def test_unknown_field():
    err = rejected(with_(zeta=1, color="red"), "unknown_field", "color")  # the first, sorted
    assert "not a field of schema v1" in str(err)


# --- rejected: field types and ranges ---

@pytest.mark.parametrize("value, kind", [("7", "a string"), (True, "a bool"), (1.0, "a float"),
                                         (None, "null")])
def test_wrong_type_user_id(value, kind):
    err = rejected(with_(user_id=value), "wrong_type", "user_id")
    assert f"is {kind} (must be an integer)" in str(err)


def test_string_duration():
    err = rejected(with_(event_type="play", play_duration_s="12"), "wrong_type", "play_duration_s")
    assert '"12"' in str(err)


def test_bool_duration():
    rejected(with_(event_type="play", play_duration_s=True), "wrong_type", "play_duration_s")


def test_negative_play_duration():
    err = rejected(with_(event_type="play", play_duration_s=-3.0), "out_of_range", "play_duration_s")
    assert str(err) == "play_duration_s: -3.0 is negative (must be >= 0)"


def test_play_duration_longer_than_a_week():
    rejected(with_(event_type="play", play_duration_s=8 * 86400), "out_of_range", "play_duration_s")


def test_zero_item_duration():
    rejected(with_(item_duration_s=0), "out_of_range", "item_duration_s")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal(literal):
    raw = json.dumps(with_(event_type="play")).replace("}", f', "play_duration_s": {literal}}}')
    err = rejected(raw, "not_finite", "play_duration_s")
    assert literal in str(err)


def test_non_finite_in_context():
    raw = json.dumps(MINIMAL).replace("}", ', "context": {"score": NaN}}')
    rejected(raw, "not_finite", "context")


def test_play_without_duration():
    rejected(with_(event_type="play"), "missing_field", "play_duration_s")


def test_rate_without_rating():
    rejected(with_(event_type="rate"), "missing_field", "rating")


@pytest.mark.parametrize("rating", [7, 0, 0.5, 5.01])
def test_rating_out_of_range(rating):
    err = rejected(with_(event_type="rate", rating=rating), "out_of_range", "rating")
    assert str(rating) in str(err)


def test_rating_on_play_event():
    err = rejected(with_(event_type="play", play_duration_s=1, rating=4), "field_not_allowed", "rating")
    assert '"play"' in str(err)


def test_bad_event_type():
    err = rejected(with_(event_type="purchase"), "bad_event_type", "event_type")
    assert '"purchase"' in str(err)
    rejected(with_(event_type=3), "wrong_type", "event_type")


def test_event_time_before_1990():
    rejected(with_(event_time_ms=MIN_EVENT_TIME_MS - 1), "out_of_range", "event_time_ms")


def test_event_time_in_seconds_gets_a_hint():
    err = rejected(with_(event_time_ms=T_1997 // 1000), "out_of_range", "event_time_ms")
    assert "seconds" in str(err)


def test_event_time_two_days_ahead():
    err = rejected(with_(event_time_ms=NOW_MS + 2 * DAY_MS), "out_of_range", "event_time_ms")
    assert "2.0 days in the future" in str(err)
    parse(with_(event_time_ms=NOW_MS + DAY_MS))  # a day of clock skew is fine


def test_ids_out_of_range():
    rejected(with_(user_id=-1), "out_of_range", "user_id")
    rejected(with_(item_id=2**63), "out_of_range", "item_id")


@pytest.mark.parametrize("value, reason", [("", "out_of_range"), ("x" * 129, "out_of_range"),
                                           ("a b", "bad_format"), ("a\tb", "bad_format"),
                                           ("a\u3000b", "bad_format"), ("a\x00b", "bad_format"),
                                           (12, "wrong_type")])
def test_bad_event_id(value, reason):
    rejected(with_(event_id=value), reason, "event_id")


def test_bad_request_id():
    rejected(with_(request_id="has space"), "bad_format", "request_id")


def test_context_too_many_keys():
    err = rejected(with_(context={f"k{i}": i for i in range(17)}), "out_of_range", "context")
    assert "17 keys" in str(err)


@pytest.mark.parametrize("context, reason", [
    ({"page": {"nested": 1}}, "wrong_type"),
    ({"ids": [1, 2]}, "wrong_type"),
    ({"x": None}, "wrong_type"),
    ({"": 1}, "out_of_range"),
    ({"k" * 65: 1}, "out_of_range"),
    ({"s": "x" * 257}, "out_of_range"),
    ({"big": 2**64}, "out_of_range"),
    ("page=home", "wrong_type"),
])
def test_bad_context(context, reason):
    rejected(with_(context=context), reason, "context")


# --- the DLQ ---

def test_dlq_headers():
    err = rejected(with_(event_type="play", play_duration_s=-3.0), "out_of_range", "play_duration_s")
    assert dict(dlq_headers(err)) == {
        "dlq.reason": b"out_of_range",
        "dlq.field": b"play_duration_s",
        "dlq.message": b"play_duration_s: -3.0 is negative (must be >= 0)",
        "dlq.schema_version": b"1",
    }


def test_dlq_headers_without_field():
    headers = dict(dlq_headers(rejected(b"nope", "malformed_json", None)))
    assert headers["dlq.field"] == b"" and headers["dlq.reason"] == b"malformed_json"
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers.items())


def test_error_survives_pickling():
    err = rejected(with_(user_id=True), "wrong_type", "user_id")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.field, str(copy)) == (err.reason, err.field, str(err))


def test_long_values_are_cut_short_in_messages():
    err = rejected(with_(event_id="x" * 1000), "out_of_range", "event_id")
    assert len(str(err)) < 200
