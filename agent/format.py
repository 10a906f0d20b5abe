"""The MiniMax-M2 conversation format: what the policy reads (`render`) and writes (`parse`).

The seam other packages import (docs/design.md). Rendering lives in `agent/render.py`, parsing in
`agent/parse.py`, the check of tool-call arguments against their schema in `agent/schema.py`; all follow
shared/reference/m2-format.md.
"""

from m2rl.agent.parse import FormatError, ParsedOutput, ToolCall, parse
from m2rl.agent.render import (
    BOS,
    DEFAULT_SYSTEM,
    EOS,
    MESSAGE_OPEN,
    STRUCTURE_MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ZERO_WIDTH_SPACE,
    RenderError,
    control_tokens,
    generation_prompt,
    neutralize_markers,
    render,
    render_completion,
    render_ids,
    render_parts,
    render_tool_suffix,
    render_user_suffix,
    visible_text,
)
from m2rl.agent.schema import ArgumentError, check_arguments, coerce_value

__all__ = [
    "BOS", "DEFAULT_SYSTEM", "EOS", "MESSAGE_OPEN", "STRUCTURE_MARKERS", "THINK_CLOSE", "THINK_OPEN",
    "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ZERO_WIDTH_SPACE", "ArgumentError", "FormatError", "ParsedOutput",
    "RenderError", "ToolCall", "check_arguments", "coerce_value", "control_tokens", "generation_prompt", "neutralize_markers", "parse", "render",
    "render_completion", "render_ids", "render_parts", "render_tool_suffix", "render_user_suffix",
    "visible_text",
]
