"""The MiniWoB page listing (pure): golden lines from a `core.getDOMInfo()`-shaped dict, and the experts' parser
reads back what the listing wrote."""

from __future__ import annotations

from m2rl.envs.miniwob.dom import listing, utterance_text
from m2rl.envs.miniwob.env import page_verdict
from m2rl.envs.miniwob.experts import labelled_input, parse_page
from m2rl.envs.miniwob.page import PageState


def node(ref, tag, children=(), **extra):
    return {"ref": ref, "tag": tag, "left": 10.0, "top": 20.0, "width": 40.0, "height": 10.0,
            "children": list(children), "id": extra.pop("id", ""), "classes": extra.pop("classes", ""), **extra}


DOM = node(1, "BODY", [node(2, "DIV", id="wrap", children=[
    node(3, "DIV", id="boxes", children=[
        node(4, "LABEL", children=[node(5, "INPUT_checkbox", id="ch0", value=False), node(-1, "t", text='say "hi"')]),
    ]),
    node(6, "INPUT_text", value="abc", focused=True),
    node(7, "SELECT", id="options"),
    node(8, "BUTTON", classes="secondary-action  big", text="Submit"),
])])


def test_listing_golden_lines_and_elements_by_ref():
    text, elements = listing(DOM, {"7": {"options": ["Iceland", "Peru"], "value": "Iceland"}})
    assert text.splitlines() == [
        "[2] DIV #wrap",
        "  [3] DIV #boxes",
        "    [4] LABEL",
        "      [5] INPUT_checkbox #ch0 checked=false",
        '      [-1] t "say \\"hi\\""',
        '  [6] INPUT_text value="abc" (focused)',
        '  [7] SELECT #options value="Iceland" options="Iceland"|"Peru"',
        '  [8] BUTTON .secondary-action.big "Submit"',
    ]
    assert set(elements) == {1, 2, 3, 4, 5, -1, 6, 7, 8}
    assert elements[8].center == (30.0, 25.0) and elements[-1].text == 'say "hi"'


def test_expert_parser_reads_the_listing_back():
    text, _ = listing(DOM)
    page = parse_page(text)
    assert [(line.ref, line.tag, line.depth) for line in page][:5] == [
        (2, "DIV", 0), (3, "DIV", 1), (4, "LABEL", 2), (5, "INPUT_checkbox", 3), (-1, "t", 3)]
    assert page[-1].text == "Submit" and page[-1].classes == "secondary-action.big"
    assert labelled_input(page, 'say "hi"').ref == 5


def test_utterance_forms():
    assert utterance_text("Click the button.") == "Click the button."
    assert utterance_text({"utterance": "Enter x", "fields": {"target": "x"}}) == "Enter x"


def test_page_verdict_is_the_pages_reward():
    assert page_verdict(PageState(False, 0.0, 0.0, None)).to_dict() == {
        "resolved": False, "score": 0.0, "details": "the page's episode had not ended: no reward"}
    full = page_verdict(PageState(True, 0.8, 1.0, None))
    assert full.resolved and full.score == 1.0
    assert page_verdict(PageState(True, 0.8, 1.0, None), reward="env").score == 0.8
    partial = page_verdict(PageState(True, 0.25, 0.25, None))
    assert not partial.resolved and partial.score == 0.25
    wrong = page_verdict(PageState(True, -1.0, -1.0, "timed out"))
    assert not wrong.resolved and wrong.score == -1.0 and "timed out" in wrong.details
