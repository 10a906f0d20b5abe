"""Fixtures for the model tests: tiny configs, random models, transformers reference checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from m2rl.model import M2Config, M2ForCausalLM

torch.set_num_threads(1)  # the CI box has 2 shared cores


@pytest.fixture
def tiny_config() -> M2Config:
    return M2Config.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config: M2Config) -> M2ForCausalLM:
    model = M2ForCausalLM(tiny_config).init_weights(std=0.1, seed=0)
    with torch.no_grad():  # non-trivial norms and routing bias so bugs in them show up
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model.eval()


def make_hf_reference(config: M2Config, seed: int = 0):
    """A random transformers MiniMaxM2ForCausalLM of the same shape, with non-zero routing bias and norms."""
    transformers = pytest.importorskip("transformers")
    hf_fields = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hf_config = transformers.MiniMaxM2Config(**hf_fields)
    torch.manual_seed(seed)
    model = transformers.MiniMaxM2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.normal_(0.0, 0.1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture
def hf_reference():
    return make_hf_reference


@pytest.fixture
def hf_tiny_dir(tmp_path: Path, tiny_config: M2Config):
    model = make_hf_reference(tiny_config)
    out = tmp_path / "hf_tiny"
    model.save_pretrained(out)
    return model, out
