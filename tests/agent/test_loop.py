"""The agent loop: token-exact trajectories, limits as exit reasons, crash safety, concurrency.

Oracles: the env's own text transcript (reset observation + actions + observations) tokenized at once,
the renderer (via check_continuity), and a tiny M2 model trained to reproduce a canonical episode.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import gymnasium as gym
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from agent_loop_doubles import (
    CalculatorEnv,
    SumTasks,
    add,
    canonical_episode_texts,
    memorized_model,
    submit,
    tiny_config,
)
from m2rl.agent.local_policy import LocalPolicy
from m2rl.agent.loop import LoopConfig, arun_episode, run_episode
from m2rl.agent.policy import PolicyError, PolicyOutput, SamplingParams
from m2rl.agent.scripted_policy import ScriptedPolicy
from m2rl.agent.trajectory import load_jsonl
from m2rl.envs import ToolEnv, ToolOutput
from m2rl.model import M2ForCausalLM, M2Tokenizer, token_logprobs
from m2rl.rewards.episode import parse_steps

TOK = M2Tokenizer.tiny()
GREEDY = SamplingParams(max_tokens=120, greedy=True)


class TextTranscript(gym.Wrapper):
    """Records the env's text view: reset observation, then every action and observation."""

    def reset(self, **kw):  # type: ignore[override]
        obs, info = self.env.reset(**kw)
        self.text = [obs]
        return obs, info

    def step(self, action):  # type: ignore[override]
        obs, r, term, trunc, info = self.env.step(action)
        self.text += [action] + ([] if term or trunc else [obs])
        return obs, r, term, trunc, info


class NoEosPrefix(gym.Wrapper):
    """An env that does not close a length-cut turn itself (the loop must add the EOS id)."""

    def step(self, action):  # type: ignore[override]
        obs, r, term, trunc, info = self.env.step(action)
        return obs.removeprefix("[e~["), r, term, trunc, info


class GarbageObservation(gym.Wrapper):
    def step(self, action):  # type: ignore[override]
        _, r, term, trunc, info = self.env.step(action)
        return "tool says hi", r, term, trunc, info


class NonCanonicalPolicy(ScriptedPolicy):
    """Same text as the script, but the first multi-character token split into one id per character: a
    tokenization the tokenizer would never produce, so re-rendering cannot reproduce these ids."""

    async def generate(self, prompt_ids, params):  # type: ignore[override]
        out = await super().generate(prompt_ids, params)
        for k, tid in enumerate(out.ids):
            piece = self.tokenizer.decode([tid])
            if len(piece) > 1 and piece.isalpha():
                split = [i for ch in piece for i in self.tokenizer.encode(ch)]
                assert len(split) > 1 and self.tokenizer.decode(split) == piece
                ids = out.ids[:k] + split + out.ids[k + 1:]
                return PolicyOutput(ids, [0.0] * len(ids), out.finish_reason, out.policy_version)
        raise AssertionError("no multi-character token to split")


class SlowPolicy(ScriptedPolicy):
    """Answers the first request at once, then hangs for 30 s."""

    async def generate(self, prompt_ids, params):  # type: ignore[override]
        if self.prompts:
            await asyncio.sleep(30)
        return await super().generate(prompt_ids, params)


class CrashingPolicy(ScriptedPolicy):
    async def generate(self, prompt_ids, params):  # type: ignore[override]
        if len(self.prompts) >= 1:
            raise ConnectionError("policy server went away")
        return await super().generate(prompt_ids, params)


def test_scripted_episode_is_token_exact(tmp_path):
    env = TextTranscript(CalculatorEnv())
    path = tmp_path / "traj.jsonl"
    traj = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), env, TOK, SamplingParams(max_tokens=200),
                       trajectory_path=path)
    assert traj.metadata["exit_reason"] == "terminated"
    assert traj.rewards == [0.0, 0.0, 1.0]
    assert traj.metadata["continuity_violations"] == 0 and traj.metadata["continuity_ok"]
    assert traj.metadata["reset_observation_matches"]
    # Oracle: the env's whole text transcript tokenized at once gives exactly the trajectory's ids.
    assert traj.ids == TOK.encode("".join(env.text))
    # Loss mask covers exactly the sampled completions, which end with EOS.
    sampled = [traj.ids[s.start:s.end] for s in traj.sampled_spans()]
    assert [TOK.decode(s) for s in sampled] == canonical_episode_texts()
    assert sum(traj.loss_mask) == sum(len(s) for s in sampled)
    assert traj.validate() == []
    # The file holds the final trajectory (one JSONL line, rewritten atomically after every step).
    [saved] = load_jsonl(path)
    assert saved == traj


def test_noncanonical_tokenization_is_counted():
    traj = run_episode(NonCanonicalPolicy(canonical_episode_texts(), TOK), CalculatorEnv(), TOK, GREEDY)
    assert traj.metadata["exit_reason"] == "terminated"  # the env saw identical text...
    assert traj.metadata["continuity_violations"] == 3  # ...but every sampled segment's ids are off
    assert not traj.metadata["continuity_ok"]


@pytest.mark.parametrize("wrapper", [None, NoEosPrefix])
def test_length_cut_segment_gets_an_env_eos(wrapper):
    env = CalculatorEnv() if wrapper is None else wrapper(CalculatorEnv())
    traj = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), env, TOK, SamplingParams(max_tokens=5),
                       LoopConfig(max_turns=2))
    assert traj.metadata["exit_reason"] == "max_turns"
    assert "2 turns" in traj.metadata["exit_message"]
    assert traj.metadata["length_cut_turns"] == 2
    for span in traj.sampled_spans():
        assert span.end - span.start == 5 and traj.ids[span.end - 1] != TOK.eos_id
    env_after_first = traj.spans[2]
    assert env_after_first.kind == "env"
    # The appended EOS closes the message but was never sampled: loss mask 0, no sampler log-prob.
    assert traj.ids[env_after_first.start] == TOK.eos_id
    assert traj.loss_mask[env_after_first.start] == 0 and traj.policy_versions[env_after_first.start] == -1
    assert TOK.decode(traj.ids[env_after_first.start:env_after_first.end]).startswith("[e~[\n]~b]tool\n<response>")
    assert traj.validate() == []


def test_context_limit_caps_turns_and_ends_episode():
    prompt_len = len(TOK.encode(CalculatorEnv().reset()[0]))
    rambling = ["let me think " * 50] * 3  # never closes </think>: the env answers with an error
    traj = run_episode(ScriptedPolicy(rambling, TOK), CalculatorEnv(), TOK,
                       SamplingParams(max_tokens=500), LoopConfig(max_context_tokens=prompt_len + 10))
    assert traj.metadata["exit_reason"] == "context_limit"
    assert str(prompt_len + 10) in traj.metadata["exit_message"]
    [span] = traj.sampled_spans()
    assert span.end - span.start == 10  # max_tokens was cut to what the context had left


def test_time_limit_is_an_exit_reason():
    traj = run_episode(SlowPolicy(canonical_episode_texts(), TOK), CalculatorEnv(), TOK, GREEDY,
                       LoopConfig(time_limit_s=2.0))
    assert traj.metadata["exit_reason"] == "time_limit"
    assert "2.0 s" in traj.metadata["exit_message"] and "generation" in traj.metadata["exit_message"]
    assert traj.metadata["elapsed_s"] < 10
    assert traj.num_turns == 1


def test_bad_observation_ends_episode_with_reason():
    traj = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), GarbageObservation(CalculatorEnv()), TOK,
                       GREEDY)
    assert traj.metadata["exit_reason"] == "env_protocol_error"
    assert "tool says hi" in traj.metadata["exit_message"]
    assert traj.num_turns == 1 and traj.spans[-1].kind == "sampled"  # nothing bogus was appended


def test_crash_keeps_everything_collected(tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(ConnectionError):
        run_episode(CrashingPolicy(canonical_episode_texts(), TOK), CalculatorEnv(), TOK, GREEDY,
                    trajectory_path=path)
    [saved] = load_jsonl(path)
    assert saved.metadata["exit_reason"] == "error" and "went away" in saved.metadata["exit_message"]
    assert saved.num_turns == 1 and saved.spans[-1].kind == "env" and saved.validate() == []


def test_scripted_policy_running_out_is_an_error():
    with pytest.raises(PolicyError, match="ran out of script"):
        run_episode(ScriptedPolicy(canonical_episode_texts()[:1], TOK), CalculatorEnv(), TOK, GREEDY)


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError, match="max_turns"):
        run_episode(ScriptedPolicy([], TOK), CalculatorEnv(), TOK, GREEDY, LoopConfig(max_turns=0))


# ---- the acceptance test: a real (tiny) M2 model through LocalPolicy --------------------------------------


def test_tiny_model_multi_turn_episode_has_zero_continuity_violations():
    """A multi-turn episode sampled by a tiny M2 model has zero continuity violations.

    The model was trained on CPU until greedy decoding writes the canonical episode (an untrained model
    writes text the parser and renderer cannot round-trip, which check_continuity rightly flags). The
    loop assembles prompt + sampled ids + env-suffix ids and check_continuity re-renders the message view.
    """
    model, transcript_ids, _ = memorized_model()
    policy = LocalPolicy(model, TOK)
    traj = run_episode(policy, CalculatorEnv(), TOK, GREEDY)
    assert traj.metadata["exit_reason"] == "terminated" and traj.rewards == [0.0, 0.0, 1.0]
    assert traj.num_turns == 3
    report = traj.check_continuity(TOK)
    assert report.ok and report.violations == 0, report
    assert traj.metadata["continuity_violations"] == 0
    assert traj.ids == transcript_ids
    # The sampler's log-probs are the model's own: recompute them on the whole trajectory.
    with torch.no_grad():
        lp = token_logprobs(model, torch.tensor([traj.ids]))[0]
    sampled = torch.tensor(traj.loss_mask, dtype=torch.bool)
    assert torch.allclose(torch.tensor(traj.logprobs)[sampled], lp[sampled].float(), atol=1e-4)


def test_concurrent_episodes_are_batched_and_exact():
    model, transcript_ids, _ = memorized_model()
    policy = LocalPolicy(model, TOK, batch_window_s=0.05)

    async def main():
        return await asyncio.gather(*[arun_episode(policy, CalculatorEnv(), TOK, GREEDY) for _ in range(3)])

    trajs = asyncio.run(main())
    assert max(policy.batch_sizes) > 1  # requests from different episodes shared a generate() call
    for traj in trajs:
        assert traj.metadata["continuity_violations"] == 0 and traj.ids == transcript_ids


def test_untrained_model_episode_is_recorded_consistently():
    """A random model writes garbage; the loop must still produce a well-formed trajectory and a clear
    continuity verdict (violations or an explained error), never a crash."""
    model = M2ForCausalLM(tiny_config()).init_weights(seed=1)
    traj = run_episode(LocalPolicy(model, TOK), CalculatorEnv(), TOK, SamplingParams(max_tokens=24, seed=0),
                       LoopConfig(max_turns=2))
    assert traj.metadata["exit_reason"] in ("max_turns", "terminated")
    assert traj.validate() == []
    assert not traj.metadata["continuity_ok"]
    assert traj.metadata["continuity_violations"] is None or traj.metadata["continuity_violations"] > 0


# ---- the real m2rl ToolEnv (no sandbox: pure-Python tools) -------------------------------------------------


def test_episode_against_the_real_tool_env():
    env = TextTranscript(ToolEnv(SumTasks(), lambda _env: [add, submit], backend=None))
    traj = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), env, TOK, GREEDY)
    assert traj.metadata["exit_reason"] == "terminated"
    assert traj.metadata["steps"][-1]["verification"]["resolved"] is True
    steps = parse_steps(traj.metadata["steps"])  # each step's info as the env returned it (StepInfo dicts)
    assert [[r.name for r in step.tool_results] for step in steps] == [["add"], ["add"], ["submit"]]
    assert [step.reward for step in steps] == traj.rewards
    assert traj.rewards[-1] > traj.rewards[0]  # the resolved bonus lands on the terminal turn
    assert traj.metadata["continuity_violations"] == 0 and traj.metadata["reset_observation_matches"]
    assert traj.ids == TOK.encode("".join(env.text))


# ----------------------------------------------------------------------------- env text and detector hits


def shell(command: str) -> ToolOutput:
    """Pretend to run a command; its output is the command's text with {} turned into <>.

    Args:
        command: the command
    """
    return ToolOutput(output=command.replace("{", "<").replace("}", ">"), commands=[command])


def _call_text(name: str, **args: str) -> str:
    from m2rl.agent.format import render_completion

    call = {"type": "function", "function": {"name": name, "arguments": args}}
    return render_completion({"role": "assistant", "reasoning_content": "Go.", "content": "", "tool_calls": [call]})


def test_detector_hits_reach_the_step_records():
    env = ToolEnv(SumTasks(), lambda _env: [shell, submit], backend=None)
    texts = [_call_text("shell", command="echo '5 passed'"), _call_text("submit", answer="9")]
    traj = run_episode(ScriptedPolicy(texts, TOK), env, TOK, GREEDY)
    steps = traj.metadata["steps"]
    assert steps[0]["detectors"] == {"fake_test_output": ["printed test summary: echo '5 passed'"]}
    assert steps[1]["detectors"] == {} and steps[1]["verification"]["resolved"] is True


MARKUP = ["{think}", "{/think}", "{minimax:tool_call}", "{/minimax:tool_call}", "{invoke name=\"x\"}", "{/invoke}",
          "{/response}\n{response}", "{parameter name=\"y\"}", "]~b]", "[e~[", "]~!b[", "\n", "{", "}", "]", "["]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(MARKUP), st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
                                                            max_size=6)), max_size=12).map("".join))
def test_tool_output_round_trips_through_the_loop_without_control_ids(output_source):
    """Whatever a tool prints, the env's reply holds only the control ids the template places, and the
    trajectory re-renders to the same ids."""
    from m2rl.agent.format import control_tokens, render_tool_suffix

    # The action must not hold markers itself ({} become <> in the tool); [ and ] are written as ( and ).
    command = output_source.replace("[", "(").replace("]", ")")
    command = command.replace("(e~(", "(e~ (")  # keep the action's own text free of markers
    env = ToolEnv(SumTasks(), lambda _env: [shell, submit], backend=None)
    texts = [_call_text("shell", command=command), _call_text("submit", answer="9")]
    policy = ScriptedPolicy(texts, TOK)
    # Room for the longest command hypothesis writes: a turn cut at max_tokens gets an env EOS before the reply.
    traj = run_episode(policy, env, TOK, SamplingParams(max_tokens=4000, greedy=True))
    if traj.metadata["exit_reason"] != "terminated":  # the command itself did not parse as one call
        return
    specials = {TOK.token_to_id(t) for t in control_tokens(TOK)}
    env_span = next(s for s in traj.spans if s.kind == "env")
    got = [i for i in traj.ids[env_span.start:env_span.end] if i in specials]
    assert got == [i for i in TOK.encode(render_tool_suffix(["x"])) if i in specials]
    assert traj.metadata["continuity_violations"] == 0


class RecordInfos(gym.Wrapper):
    def reset(self, **kw):  # type: ignore[override]
        self.infos = []
        return self.env.reset(**kw)

    def step(self, action):  # type: ignore[override]
        result = self.env.step(action)
        self.infos.append(result[-1])
        return result


def test_step_records_are_the_envs_step_infos():
    """Before: the loop kept a hand-picked subset of each info's keys (plus its own "tools" key), a second
    dict contract beside the env's."""
    from m2rl.rewards.episode import StepInfo

    env = RecordInfos(ToolEnv(SumTasks(), lambda _env: [add, submit], backend=None))
    traj = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), env, TOK, GREEDY)
    assert len(env.infos) == 3
    assert traj.metadata["steps"] == [StepInfo.from_dict(info).to_dict() for info in env.infos]
    assert traj.metadata["steps"][0]["tool_results"][0]["output"] == "5"
