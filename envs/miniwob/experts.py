"""SCRIPTED POLICIES for `m2rl/MiniWoB-v0`: solvers for the default pages, and a random clicker.

Same protocol as envs/experts.py: a script is a generator over the task that yields each turn's tool calls and
receives their outputs. Every fact a solver uses comes from what the policy sees: the instruction and the page
listing in the task's prompt (the first observation) and the listings the tools return; never the page's hidden
state. The page grades the result, so a solver that misreads the page gets the page's negative reward.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from m2rl.envs.experts import Call, Script
from m2rl.envs.tasks.base import Task

_LINE = re.compile(r'^(?P<indent> *)\[(?P<ref>-?\d+)\] (?P<tag>\S+)(?: #(?P<id>\S+))?(?: \.(?P<classes>\S+))?'
                   r'(?: "(?P<text>(?:[^"\\]|\\.)*)")?')
MAX_RANDOM_CLICKS = 64  # the env's max_steps ends the random clicker's episode first


@dataclass(frozen=True)
class Line:
    depth: int
    ref: int
    tag: str
    id: str
    classes: str
    text: str


def parse_page(text: str) -> list[Line]:
    """The listed elements of an observation (dom.py's format), in document order."""
    lines = []
    for raw in text.splitlines():
        if m := _LINE.match(raw):
            lines.append(Line(len(m["indent"]) // 2, int(m["ref"]), m["tag"], m["id"] or "", m["classes"] or "",
                              (m["text"] or "").replace('\\"', '"')))
    return lines


def instruction(task: Task) -> str:
    m = re.search(r"^Instruction: (.*)$", task.prompt, re.MULTILINE)
    if m is None:
        raise ValueError(f"no instruction in the prompt of {task.id}")
    return m.group(1)


def quoted(text: str) -> list[str]:
    return re.findall(r'"([^"]*)"', text)


def find(page: list[Line], tag: str | None = None, text: str | None = None, id: str | None = None) -> Line:
    for line in page:
        if (tag is None or line.tag == tag) and (text is None or line.text == text) and (id is None or line.id == id):
            return line
    raise ValueError(f"no element with tag={tag} text={text!r} id={id} on the page")


def labelled_input(page: list[Line], label: str) -> Line:
    """The checkbox or radio button a LABEL holds next to the text `label`."""
    for i, line in enumerate(page):
        if line.tag == "t" and line.text == label:
            for before in reversed(page[:i]):
                if before.tag.startswith("INPUT_") and before.depth == line.depth:
                    return before
    raise ValueError(f"no input labelled {label!r}")


def _click(line: Line) -> list[Call]:
    return [("click", {"ref": line.ref})]


def _submit(page: list[Line]) -> list[Call]:
    return _click(find(page, "BUTTON", text="Submit"))


# ----------------------------------------------------------------------------- solvers, one per page


def click_test(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield _click(find(page, "BUTTON"))


def click_button(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield _click(find(page, "BUTTON", text=quoted(instruction(task))[0]))


def click_button_sequence(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield _click(find(page, "BUTTON", text="ONE"))
    yield _click(find(page, "BUTTON", text="TWO"))


def click_checkboxes(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    wanted = re.match(r"Select (.*) and click Submit\.", instruction(task)).group(1)  # type: ignore[union-attr]
    labels = [] if wanted == "nothing" else [w.strip() for w in wanted.split(",") if w.strip()]
    for label in labels:
        yield _click(labelled_input(page, label))
    yield _submit(page)


def click_option(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    label = re.match(r"Select (.*) and click Submit\.", instruction(task)).group(1)  # type: ignore[union-attr]
    yield _click(labelled_input(page, label))
    yield _submit(page)


def click_link(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield _click(find(page, "SPAN", text=quoted(instruction(task))[0]))


def click_dialog(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    close = find(page, "t", text="Close")  # the jQuery UI close button's (visually hidden) label
    button = next(line for line in reversed(page[: page.index(close)]) if line.depth == close.depth - 1)
    yield _click(button)


def click_tab(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    number = re.search(r"Tab #(\d+)", instruction(task)).group(1)  # type: ignore[union-attr]
    yield _click(find(page, "A", text=f"Tab #{number}"))


def enter_text(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield [("type", {"ref": find(page, "INPUT_text").ref, "text": quoted(instruction(task))[0]})]
    yield _submit(page)


def enter_password(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    password = quoted(instruction(task))[0]
    yield [("type", {"ref": line.ref, "text": password}) for line in page if line.tag == "INPUT_password"]
    yield _submit(page)


def focus_text(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    yield _click(find(page, "INPUT_text"))


def choose_list(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    option = re.match(r"Select (.*) from the list and click Submit\.", instruction(task)).group(1)  # type: ignore[union-attr]
    yield [("select", {"ref": find(page, "SELECT").ref, "option": option})]
    yield _submit(page)


def login_user(task: Task, page: list[Line]) -> Iterator[list[Call]]:
    username, password = quoted(instruction(task))[:2]
    yield [("type", {"ref": find(page, id="username").ref, "text": username}),
           ("type", {"ref": find(page, id="password").ref, "text": password})]
    yield _click(find(page, "BUTTON", text="Login"))


SOLVERS: dict[str, Callable[[Task, list[Line]], Iterator[list[Call]]]] = {
    "click-test": click_test, "click-button": click_button, "click-button-sequence": click_button_sequence,
    "click-checkboxes": click_checkboxes, "click-option": click_option, "click-link": click_link,
    "click-dialog": click_dialog, "click-tab": click_tab, "enter-text": enter_text,
    "enter-password": enter_password, "focus-text": focus_text, "choose-list": choose_list,
    "login-user": login_user,
}


def miniwob_expert(task: Task) -> Script:
    """Plays the page's solver on the first observation; the pages here need no later observation."""
    if task.kind not in SOLVERS:
        raise ValueError(f"no MiniWoB solver for {task.kind!r}; solvers: {', '.join(sorted(SOLVERS))}")
    yield from SOLVERS[task.kind](task, parse_page(task.prompt))


def miniwob_random(task: Task) -> Script:
    """Clicks a uniformly random listed element each turn (seeded by the task) until the page ends the episode."""
    rng = random.Random(task.seed)
    page = parse_page(task.prompt)
    for _ in range(MAX_RANDOM_CLICKS):
        if not page:
            return
        (output,) = yield [("click", {"ref": rng.choice(page).ref})]
        page = parse_page(output) or page
