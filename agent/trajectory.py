"""Token-exact trajectories: the ids the policy saw and sampled, and what the learner needs about each.

Rollout code never re-renders history. It appends the prompt ids once, then per turn the ids the
sampler returned (`append_sampled`, loss mask 1) and the ids of the rendered env suffix
(`append_env`, loss mask 0), e.g. `tokenizer.encode(render_tool_suffix(results))`. The message view
(`messages`) is kept for humans and for `check_continuity`, which verifies that re-rendering it gives
the same ids (agent/continuity.py).

Per token: `ids`, `loss_mask` (1 only on policy-sampled tokens), `logprobs` (the sampler's, 0.0 on
non-sampled tokens), `policy_versions` (the weights version that sampled it, -1 on non-sampled).
Spans: `[start, end)` token ranges, kind "prompt" | "sampled" | "env", `turn` = index of the sampled
segment they belong to (prompt and the env reply to turn k carry turn k).
Saved as JSONL, one trajectory per line; `load_jsonl(save_jsonl(x)) == x`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from m2rl.runs import append_text, read_jsonl

SpanKind = Literal["prompt", "sampled", "env"]
SPAN_KINDS = ("prompt", "sampled", "env")



@dataclass
class TurnSpan:
    kind: str  # "prompt" | "sampled" | "env"
    start: int  # first token index
    end: int  # one past the last token index
    turn: int  # index of the sampled segment this span belongs to


@dataclass
class Trajectory:
    ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    spans: list[TurnSpan] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # one per sampled turn, filled by the env loop
    messages: list[dict[str, Any]] = field(default_factory=list)  # OpenAI-style view for humans
    tools: list[dict[str, Any]] | None = None  # the tool specs rendered into the prompt
    enable_thinking: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- building (append-only) ----
    @property
    def num_turns(self) -> int:
        return sum(1 for s in self.spans if s.kind == "sampled")

    def _append(self, kind: str, ids: Sequence[int], logprobs: Sequence[float], version: int, mask: int) -> TurnSpan:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"{kind} ids must be non-negative token ids, got {[i for i in ids if i < 0][:5]}")
        turn = self.num_turns - (1 if kind != "sampled" and self.num_turns else 0)
        span = TurnSpan(kind, len(self.ids), len(self.ids) + len(ids), turn if kind != "sampled" else self.num_turns)
        self.ids += ids
        self.loss_mask += [mask] * len(ids)
        self.logprobs += [float(x) for x in logprobs]
        self.policy_versions += [version] * len(ids)
        self.spans.append(span)
        return span

    def append_prompt(self, ids: Sequence[int]) -> TurnSpan:
        """The rendered first prompt (system, tools, first user message, generation prompt)."""
        return self._append("prompt", ids, [0.0] * len(ids), -1, 0)

    def append_sampled(self, ids: Sequence[int], logprobs: Sequence[float], version: int) -> TurnSpan:
        """Ids exactly as the sampler returned them (ending with EOS unless cut by the length limit)."""
        if len(ids) != len(logprobs):
            raise ValueError(f"append_sampled: {len(ids)} ids but {len(logprobs)} logprobs")
        bad = [x for x in logprobs if math.isnan(float(x)) or float(x) > 1e-4]
        if bad:
            raise ValueError(f"append_sampled: log-probs must be <= 0 and not NaN, got {bad[:5]}")
        if int(version) < 0:
            raise ValueError(f"append_sampled: policy version must be >= 0, got {version}")
        return self._append("sampled", ids, logprobs, int(version), 1)

    def append_env(self, ids: Sequence[int]) -> TurnSpan:
        """Ids of the rendered env suffix (tool results or user reply, then the next generation prompt)."""
        return self._append("env", ids, [0.0] * len(ids), -1, 0)

    @property
    def chat_mode(self) -> bool:
        """A chat model played it (`metadata["chat_mode"]`, set by the agent loop for a `ChatPolicy`): its
        "sampled" ids are our tokenization of the model's messages and its log-probs are 0.0 placeholders.
        Scored like any episode, never trained on (the learner refuses it)."""
        return bool(self.metadata.get("chat_mode"))

    def sampled_spans(self) -> list[TurnSpan]:
        return [s for s in self.spans if s.kind == "sampled"]

    def validate(self) -> list[str]:
        """Internal consistency problems (empty when the trajectory is well formed)."""
        problems = []
        n = len(self.ids)
        for name in ("loss_mask", "logprobs", "policy_versions"):
            if len(getattr(self, name)) != n:
                problems.append(f"{name} has {len(getattr(self, name))} entries for {n} ids")
        pos = 0
        for k, s in enumerate(self.spans):
            if s.kind not in SPAN_KINDS:
                problems.append(f"span {k} has unknown kind {s.kind!r}")
            if s.start != pos or s.end < s.start:
                problems.append(f"span {k} [{s.start}, {s.end}) does not continue at {pos}")
            pos = s.end
        if pos != n:
            problems.append(f"spans cover {pos} tokens, ids has {n}")
        if not problems:
            for s in self.spans:
                want = 1 if s.kind == "sampled" else 0
                if any(m != want for m in self.loss_mask[s.start:s.end]):
                    problems.append(f"loss_mask of {s.kind} span [{s.start}, {s.end}) is not all {want}")
                if s.kind != "sampled" and any(v != -1 for v in self.policy_versions[s.start:s.end]):
                    problems.append(f"policy_versions of {s.kind} span [{s.start}, {s.end}) are not -1")
        if len(self.rewards) > self.num_turns:
            problems.append(f"{len(self.rewards)} rewards for {self.num_turns} sampled turns")
        return problems

    def check_continuity(self, tokenizer: Any, tools: Sequence[dict[str, Any]] | None = None,
                         enable_thinking: bool | None = None) -> Any:
        """See `m2rl.agent.continuity.check_continuity`; defaults to this trajectory's tools and mode."""
        from m2rl.agent.continuity import check_continuity

        return check_continuity(self, tokenizer, tools, enable_thinking)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        if not isinstance(d, dict):
            raise TypeError(f"a trajectory must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown trajectory fields: {sorted(unknown)}")
        d = dict(d)
        d["spans"] = [TurnSpan(**s) for s in d.get("spans", [])]
        d["logprobs"] = [float(x) for x in d.get("logprobs", [])]
        return cls(**d)

    def to_json(self) -> str:
        # ensure_ascii=False keeps the line readable; allow_nan covers -inf log-probs of forced tokens.
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls.from_dict(json.loads(line))


def save_jsonl(path: str | Path, trajectories: Iterable[Trajectory]) -> None:
    """Append trajectories to `path`, one per line, in one write (see `m2rl.runs.append_text`)."""
    append_text(path, "".join(t.to_json() + "\n" for t in trajectories))


def load_jsonl(path: str | Path, skip_torn_last_line: bool = True) -> list[Trajectory]:
    """Read every trajectory of `path`. A torn final line (a writer crashed mid-write) is skipped when
    `skip_torn_last_line`; any other bad line raises ValueError naming the line."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no trajectory file at {path}")
    out = []
    for no, record in enumerate(read_jsonl(path, skip_torn_last_line), 1):
        try:
            out.append(Trajectory.from_dict(record))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}:{no}: record {no} is not a valid trajectory: {e}") from e
    return out
