"""A softmax-routed, bias-free tiny checkpoint from save_pretrained loads in real vLLM (CPU) and gives the
same greedy tokens and log-probs as our model. vLLM runs in a subprocess (it spawns workers)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from m2rl.model import (
    M2Config,
    M2ForCausalLM,
    M2Tokenizer,
    SamplingParams,
    generate,
    save_pretrained,
    token_logprobs,
)

VLLM_SCRIPT = textwrap.dedent('''
    import json, sys
    def main():
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=128, seed=0,
                  gpu_memory_utilization=0.2)
        prompt = json.loads(sys.argv[2])
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, prompt_logprobs=0))[0]
        gen = out.outputs[0]
        print("RESULT " + json.dumps({
            "ids": list(gen.token_ids),
            "logprobs": [d[t].logprob for d, t in zip(gen.logprobs, gen.token_ids)],
            "prompt_logprobs": [0.0 if d is None else d[t].logprob for d, t in zip(out.prompt_logprobs, prompt)],
        }))
    if __name__ == "__main__":
        main()
''')


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_our_export(tmp_path):
    config = M2Config.from_preset("tiny", scoring_func="softmax", use_routing_bias=False)
    model = M2ForCausalLM(config).init_weights(std=0.1, seed=5).eval()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=M2Tokenizer.tiny())
    prompt = [5, 17, 300, 9, 44, 1000]
    (tmp_path / "run.py").write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "ckpt"), json.dumps(prompt)],
                          check=False, capture_output=True, text=True, timeout=540, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"vLLM failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    got = json.loads(lines[-1].removeprefix("RESULT "))
    ours = generate(model, [prompt], SamplingParams(max_tokens=6, greedy=True))[0]
    assert got["ids"] == ours.ids
    assert got["logprobs"] == pytest.approx(ours.raw_logprobs, abs=1e-3)
    expected = token_logprobs(model, torch.tensor([prompt]))[0].tolist()
    assert got["prompt_logprobs"] == pytest.approx(expected, abs=1e-3)
