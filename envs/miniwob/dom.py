"""The text a MiniWoB page shows the policy: the page's own DOM listing (`core.getDOMInfo()`), one line per element.

Pure functions of the dict `core.getDOMInfo()` returns (miniwob/html/core/core.js), so they are tested without a
browser. Each element keeps its `ref` for the whole episode (core.js stores it in `data-wob_ref`), so a ref the
policy read two turns ago still names the same element. Text pieces inside mixed content are pseudo-elements
with negative refs (tag `t`); they can be clicked like elements.

    [2] DIV #area
      [5] BUTTON "Submit"
      [6] INPUT_text value="" (focused)
      [-1] t "lorem ipsum"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_TEXT_CHARS = 80  # of one element's own text in the listing
MAX_CLASS_CHARS = 60  # jQuery UI widgets carry long class lists; their first classes say what they are


@dataclass(frozen=True)
class Element:
    """One listed element: what the policy reads and where the mouse goes to click it."""

    ref: int
    tag: str  # upper case; inputs as INPUT_<type> (core.js); `t` for a text piece
    text: str
    left: float
    top: float
    width: float
    height: float

    @property
    def center(self) -> tuple[float, float]:
        return self.left + self.width / 2, self.top + self.height / 2


def _quote(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return '"' + text.replace('"', '\\"') + '"'


def element_line(node: dict[str, Any], select: dict[str, Any] | None = None) -> str:
    """`[ref] TAG #id .classes "text" value=... (focused)` for one node of `core.getDOMInfo()`; a SELECT's
    chosen option and options (its closed list has no boxes, so core.js lists none) come from `select`
    ({options, value}) as `value="a" options="a"|"b"`."""
    if select is not None:
        node = {**node, "value": select.get("value", "")}
    parts = [f"[{node['ref']}]", str(node.get("tag", "?"))]
    if node.get("id"):
        parts.append(f"#{node['id']}")
    classes = node.get("classes")
    if isinstance(classes, str) and classes.strip():  # SVG elements give an SVGAnimatedString object instead
        parts.append("." + ".".join(classes.split())[:MAX_CLASS_CHARS])
    if node.get("text"):
        parts.append(_quote(str(node["text"]), MAX_TEXT_CHARS))
    if "value" in node:
        value = node["value"]
        parts.append(f"checked={str(value).lower()}" if isinstance(value, bool) else f"value={_quote(str(value), 80)}")
    if select is not None:
        parts.append("options=" + "|".join(_quote(str(o), MAX_TEXT_CHARS) for o in select.get("options", [])))
    if node.get("focused"):
        parts.append("(focused)")
    return " ".join(parts)


def flatten(root: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(depth, node) in document order."""
    out: list[tuple[int, dict[str, Any]]] = []
    stack = [(0, root)]
    while stack:
        depth, node = stack.pop()
        out.append((depth, node))
        stack.extend((depth + 1, child) for child in reversed(node.get("children") or []))
    return out


def listing(root: dict[str, Any], selects: dict[str, dict[str, Any]] | None = None) -> tuple[str, dict[int, Element]]:
    """The page as indented lines, and its elements by ref (for the tools). BODY is the root and not listed.
    `selects`: each SELECT's {options, value} by ref (JSON keys are strings)."""
    lines: list[str] = []
    elements: dict[int, Element] = {}
    for depth, node in flatten(root):
        ref = int(node["ref"])
        elements[ref] = Element(ref, str(node.get("tag", "")), str(node.get("text") or ""), float(node["left"]),
                                float(node["top"]), float(node["width"]), float(node["height"]))
        if depth > 0:
            lines.append("  " * (depth - 1) + element_line(node, (selects or {}).get(str(ref))))
    return "\n".join(lines), elements


def utterance_text(response: Any) -> str:
    """`core.getUtterance()` returns the instruction, or {utterance, fields} on pages that parse their own."""
    if isinstance(response, dict):
        return str(response.get("utterance", ""))
    return str(response or "")
