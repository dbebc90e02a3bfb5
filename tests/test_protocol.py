"""The action grammar: what models write, what users' policies must write, and every way it can go wrong."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibisagent.clicks import Click
from ibisagent.protocol import (
    Action,
    ProtocolError,
    Response,
    format_response,
    is_strict_format,
    parse_response,
    to_pixel,
    to_relative,
)

RELEASED = """<think>
The liver occupies the upper left of the abdomen; the mask is empty, so I start inside it.
</think>
<action>
Positive Point (0.5123, 0.3012)
</action>"""


def test_parses_released_checkpoint_output() -> None:
    r = parse_response(RELEASED)
    assert r.think.startswith("The liver")
    assert r.actions == (Action("positive", 0.5123, 0.3012),)
    assert r.answer is None and not r.terminates
    assert is_strict_format(RELEASED)


def test_several_clicks_with_targets_and_terminate_with_answer() -> None:
    text = ("<think>\nTwo organs.\n</think>\n<action>\nPositive Point (0.1000, 0.2000) [liver]\n"
            "Negative Point (0.9000, 1.0000) [spleen]\n</action>")
    r = parse_response(text)
    assert [(a.kind, a.target) for a in r.actions] == [("positive", "liver"), ("negative", "spleen")]
    done = parse_response("<think>\nGood.\n</think>\n<action>\nTerminate\n</action>\n<answer>\nThe liver.\n</answer>")
    assert done.terminates and done.answer == "The liver."
    vqa = parse_response("<think>\nNo lesion visible.\n</think>\n<answer>\nnot present\n</answer>")
    assert vqa.terminates and vqa.actions == () and vqa.answer == "not present"


@pytest.mark.parametrize(
    "text",
    [
        "<think>x</think><action>Positive Point (0.5,0.5)</action>",  # no newlines
        "<think>\nx\n</think>\n<action>\nTermination\n</action>\n<answer>\nok\n</answer>",  # Termination
        "<think>\nx\n</think>\n<action>\npositive point (0.5000, 0.5000)\n</action>",  # lower case
        "Sure! <think>\nx\n</think>\n<action>\nUndo\n</action> done",  # text outside the tags
        "<think>\nx\n</think>\n<action>\nTerminate\n</action>",  # Terminate without answer
    ],
)
def test_lenient_parser_accepts_what_strict_format_rejects(text: str) -> None:
    parse_response(text)
    assert not is_strict_format(text)


MALFORMED = [
    "",
    "just words",
    "<action>\nPositive Point (0.5, 0.5)\n</action>",  # no think
    "<think>\nx\n</think>",  # neither action nor answer
    "<think>\nx\n<action>\nUndo\n</action>",  # unclosed think
    "<think>\nx\n</think>\n<action>\nUndo\n",  # unclosed action
    "<think>\nx\n</think>\nUndo\n</action>",  # closed, not opened
    "<think>\nx\n</think>\n<think>\ny\n</think>\n<action>\nUndo\n</action>",  # twice
    "</think>x<think>\n<action>\nUndo\n</action>",  # reversed
    "<think>\n<action>x</action>\n</think>\n<action>\nUndo\n</action>",  # nested
    "<think>\nx\n</think>\n<action>\n\n</action>",  # empty action
    "<think>\nx\n</think>\n<action>\nZoom In (0.5, 0.5)\n</action>",  # unknown action
    "<think>\nx\n</think>\n<action>\nPositive Point (1.2, 0.5)\n</action>",  # out of range
    "<think>\nx\n</think>\n<action>\nNegative Point (-0.1, 0.5)\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point (nan, 0.5)\n</action>",  # not finite
    "<think>\nx\n</think>\n<action>\nPositive Point (inf, 0.5)\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point (0.5)\n</action>",  # one coordinate
    "<think>\nx\n</think>\n<action>\nPositive Point (0.5, )\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point (0.5, 0.2, 0.1)\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point (a, b)\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point\n</action>",
    "<think>\nx\n</think>\n<action>\nPositive Point (0.5, 0.5)\nTerminate\n</action>",  # terminate not alone
    "<think>\nx\n</think>\n<action>\nUndo\n</action>\n<answer>\nhm\n</answer>",  # answer after non-final
    "<think>\nx\n</think>\n<action>\n正点 (0.5, 0.5)\n</action>",  # another language
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_output_raises_protocol_error_only(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_response(text)
    assert not is_strict_format(text)


def test_non_string_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        parse_response(None)  # type: ignore[arg-type]
    assert issubclass(ProtocolError, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_never_raises_anything_but_protocol_error(text: str) -> None:
    try:
        parse_response(text)
    except ProtocolError:
        pass


_coord = st.integers(0, 10_000).map(lambda v: v / 10_000)
_safe_text = st.text(
    alphabet=st.characters(blacklist_characters="<>[]\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
                           blacklist_categories=("Cs",)),
    min_size=1, max_size=40,
).map(str.strip).filter(bool)
_click = st.builds(Action, st.sampled_from(["positive", "negative"]), _coord, _coord, st.none() | _safe_text)
_response = st.one_of(
    st.builds(Response, _safe_text, st.lists(st.one_of(_click, st.just(Action("undo")), st.just(Action("reset"))),
                                             min_size=1, max_size=5).map(tuple), st.none()),
    st.builds(Response, _safe_text, st.just((Action("terminate"),)), _safe_text),
    st.builds(Response, _safe_text, st.just(()), _safe_text),
)


@settings(max_examples=300, deadline=None)
@given(_response)
def test_format_parse_round_trip(response: Response) -> None:
    text = format_response(response)
    assert parse_response(text) == response
    assert is_strict_format(text)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4096), st.integers(1, 4096), st.data())
def test_pixel_relative_round_trip(width: int, height: int, data: st.DataObject) -> None:
    px = data.draw(st.integers(0, width - 1))
    py = data.draw(st.integers(0, height - 1))
    x, y = to_relative(px, py, width, height)
    assert 0 <= x <= 1 and 0 <= y <= 1
    assert to_pixel(x, y, width, height) == (px, py)
    click = Click(px, py, positive=False)
    assert Action.from_click(click, width, height).to_click(width, height) == click


def test_relative_one_maps_to_last_pixel_and_x_is_horizontal() -> None:
    assert to_pixel(1.0, 1.0, 200, 100) == (199, 99)
    assert Action("positive", 0.9, 0.1).to_click(200, 100) == Click(x=180, y=10, positive=True)
    with pytest.raises(ValueError):
        to_relative(200, 0, 200, 100)
