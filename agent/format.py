"""The MiniMax-M2 conversation format: what the policy reads (`render`) and writes (`parse`).

The seam other packages import (docs/design.md). Rendering lives in `agent/render.py`, parsing in
`agent/parse.py`; both follow shared/reference/m2-format.md.
"""

from m2rl.agent.parse import FormatError, ParsedOutput, ToolCall, coerce_value, parse
from m2rl.agent.render import (
    BOS,
    DEFAULT_SYSTEM,
    EOS,
    MESSAGE_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    RenderError,
    generation_prompt,
    render,
    render_completion,
    render_ids,
    render_parts,
    render_tool_suffix,
    render_user_suffix,
    visible_text,
)

__all__ = [
    "BOS", "DEFAULT_SYSTEM", "EOS", "MESSAGE_OPEN", "THINK_CLOSE", "THINK_OPEN", "TOOL_CALL_CLOSE",
    "TOOL_CALL_OPEN", "FormatError", "ParsedOutput", "RenderError", "ToolCall", "coerce_value",
    "generation_prompt", "parse", "render", "render_completion", "render_ids", "render_parts",
    "render_tool_suffix", "render_user_suffix", "visible_text",
]
