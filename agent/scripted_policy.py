"""ScriptedPolicy: a deterministic test double that replays a fixed list of texts.

Like mini-swe-agent's DeterministicModel: it lets the agent loop and the envs be tested without a
network or a trained model. Each `generate` call returns the next scripted text, tokenized with the
real tokenizer; log-probs are 0 (the script is "certain"). It honours `max_tokens` and `stop_ids` the
way a real sampler does, so the loop's truncation paths can be exercised.
"""

from __future__ import annotations

from collections.abc import Sequence

from m2rl.agent.policy import PolicyError, PolicyOutput, SamplingParams, validate_prompt_ids
from m2rl.model.tokenizer import M2Tokenizer


class ScriptedPolicy:
    def __init__(self, texts: Sequence[str], tokenizer: M2Tokenizer, policy_version: int = 0) -> None:
        if isinstance(texts, str):
            raise TypeError("ScriptedPolicy expects a list of texts, got a single str")
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.policy_version = policy_version
        self.prompts: list[list[int]] = []  # every prompt it was asked to continue, for assertions
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self.texts) - self._next

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        prompt_ids = validate_prompt_ids(prompt_ids, self.tokenizer.vocab_size)
        if self._next >= len(self.texts):
            raise PolicyError(f"ScriptedPolicy ran out of script after {len(self.texts)} outputs")
        text = self.texts[self._next]
        self._next += 1
        self.prompts.append(prompt_ids)

        ids = self.tokenizer.encode(text)
        stops = {self.tokenizer.eos_id, *params.stop_ids}
        # Cut at the first stop id (kept, as a sampler keeps the EOS it sampled), then at max_tokens.
        finish = "length"
        for i, t in enumerate(ids):
            if t in stops and i < params.max_tokens:
                ids, finish = ids[: i + 1], "stop"
                break
        if finish == "length":
            # A scripted text without EOS reads as a segment the sampler cut at its token budget.
            ids = ids[: params.max_tokens]
        return PolicyOutput(ids=ids, logprobs=[0.0] * len(ids), finish_reason=finish,
                            policy_version=self.policy_version)
