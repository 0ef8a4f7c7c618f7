"""Strict input: what decode_text_frame accepts survives msgpack (the channel layer) and JSON.parse (browsers)."""

import json
import math

import msgpack
import pytest
from realtime.protocol import MAX_JSON_DEPTH, MAX_SAFE_INTEGER, FrameError, decode_text_frame, dumps

LIMIT = 64 * 1024


def nested(levels: int, opener: str = "[", closer: str = "]") -> str:
    """A frame whose "message" holds ``levels - 1`` containers: ``levels`` in all."""
    return '{"message":' + opener * (levels - 1) + "1" + closer * (levels - 1) + "}"


def refusal(text: str) -> FrameError:
    with pytest.raises(FrameError) as caught:
        decode_text_frame(text, None, LIMIT)
    return caught.value


def packs(value) -> bool:
    """What channels_redis does to every event: msgpack.packb(..., use_bin_type=True)."""
    try:
        msgpack.packb(value, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, ValueError):
        return False
    return True


def browser_parses(value) -> bool:
    """Whether the JSON sent to members is JSON that JSON.parse accepts (no NaN, no Infinity)."""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


REFUSED = {
    # frame: (code, words the detail must contain)
    '{"message": NaN}': ("bad_json", "finite"),
    '{"message": "x", "sent_at": Infinity}': ("bad_json", "finite"),
    '{"message": "x", "sent_at": -Infinity}': ("bad_json", "finite"),
    '{"message": "x", "sent_at": 1e400}': ("bad_json", "1e400"),
    '{"message": "x", "sent_at": [[-1e999]]}': ("bad_json", "finite"),
    '{"message": "x", "id": %d}' % 2**64: ("bad_schema", "as strings"),
    '{"message": "x", "id": %d}' % -(2**63 + 1): ("bad_schema", "2**53 - 1"),
    '{"message": "x", "id": %d}' % (MAX_SAFE_INTEGER + 1): ("bad_schema", "2**53 - 1"),
    '{"message": "x", "sent_at": {"n": [%d]}}' % 2**70: ("bad_schema", "2**53 - 1"),
    '{"message": "\\ud800"}': ("bad_json", "surrogate"),
    '{"message": "ok \\udfff"}': ("bad_json", "surrogate"),
    '{"message": "x", "\\udc00": 1}': ("bad_json", "surrogate"),
    '{"message": "x", "id": {"deep": ["\\ud83d"]}}': ("bad_json", "surrogate"),
    nested(MAX_JSON_DEPTH + 1): ("bad_json", f"deeper than {MAX_JSON_DEPTH} levels"),
    nested(MAX_JSON_DEPTH + 1, '{"a":', "}"): ("bad_json", f"deeper than {MAX_JSON_DEPTH} levels"),
    nested(600): ("bad_json", f"deeper than {MAX_JSON_DEPTH} levels"),
    # Under 64 KiB, and deep enough to exhaust json.loads' recursion.
    nested(10_000): ("bad_json", f"deeper than {MAX_JSON_DEPTH} levels"),
    nested(10_000, '{"a":', "}"): ("bad_json", f"deeper than {MAX_JSON_DEPTH} levels"),
}


@pytest.mark.parametrize("text", REFUSED, ids=lambda text: text[:40])
def test_each_class_of_unportable_json_is_refused_with_its_code_and_a_sentence(text):
    code, words = REFUSED[text]
    error = refusal(text)
    assert error.code == code
    assert words in error.detail
    assert error.detail[0].isalpha() and len(error.detail.split()) >= 6, error.detail


@pytest.mark.parametrize(
    "text",
    [
        '{"message": NaN}',
        '{"message": "x", "sent_at": 1e400}',
        '{"message": "x", "id": %d}' % 2**64,
        '{"message": "\\ud800"}',
        '{"message": "x", "\\udc00": 1}',
    ],
    ids=lambda text: text[:40],
)
def test_the_refused_classes_really_break_msgpack_or_browsers_without_the_check(text):
    """Python's json module takes each of these; the channel layer or the members' JSON.parse does not."""
    value = json.loads(text)
    assert not (packs(value) and browser_parses(value))


def test_ten_thousand_levels_make_json_loads_itself_fail():
    with pytest.raises(RecursionError):
        json.loads(nested(10_000))
    assert len(nested(10_000).encode()) < LIMIT


@pytest.mark.parametrize(
    "text",
    [
        nested(MAX_JSON_DEPTH),
        nested(MAX_JSON_DEPTH, '{"a":', "}"),
        '{"message": "x", "id": %d, "sent_at": %d}' % (MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER),
        '{"message": "x", "sent_at": 1.7976931348623157e308, "n": -0.0, "ok": true, "none": null}',
        '{"message": "caf\\u00e9 \\ud83d\\ude00 \u00e9\U0001f600", "\\u00e9": ["\\ud83d\\ude00"]}',
        '{"message": "' + "x" * (LIMIT - 20) + '"}',
    ],
    ids=lambda text: text[:40],
)
def test_the_edges_of_every_rule_are_accepted_and_round_trip(text):
    payload = decode_text_frame(text, None, LIMIT)
    assert packs(payload) and browser_parses(payload)
    assert json.loads(dumps(payload)) == payload


def test_flat_frames_wide_enough_to_fill_the_limit_are_accepted():
    # Depth counts nesting, not containers side by side.
    text = '{"message": "x", "list": [' + ",".join(["[]"] * 20_000) + "]}"
    assert len(text) < LIMIT
    assert len(decode_text_frame(text, None, LIMIT)["list"]) == 20_000


def test_the_older_rules_still_hold():
    assert refusal("not json").code == "bad_json"
    assert "not valid JSON" in refusal("{").detail
    assert refusal("[]").detail == "frame must be a JSON object, got list"
    assert refusal('{"message": "' + "x" * LIMIT + '"}').code == "too_large"
    with pytest.raises(FrameError, match="binary frames are not accepted"):
        decode_text_frame(None, b"{}", LIMIT)
    assert math.isnan(json.loads("NaN"))  # what Python alone would have let through
