import json
import logging

import pytest
import torch
from m2rl.model import (
    CheckpointError,
    M2Config,
    M2ConfigError,
    M2ForCausalLM,
    M2Tokenizer,
    checkpoint_tensors,
    load_pretrained,
    save_pretrained,
)
from m2rl.model.fp8 import FP8_DTYPE
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ids_for(config: M2Config, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(seed))


def test_transformers_checkpoint_loads_with_same_logits(hf_tiny_dir, tiny_config):
    hf_model, path = hf_tiny_dir
    assert any("e_score_correction_bias" in k for k in load_file(path / "model.safetensors"))
    ours = load_pretrained(path)
    ids = ids_for(tiny_config)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert rel_err(got, expected) <= 1e-4


def test_our_checkpoint_loads_into_transformers(hf_tiny_dir, tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_model, path = hf_tiny_dir
    ours = load_pretrained(path)
    out = tmp_path / "ours"
    save_pretrained(ours, out, tokenizer=M2Tokenizer.tiny(), max_shard_bytes=600_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rotary_dim"] == 16 and cfg["partial_rotary_factor"] == 0.5 and "rope_parameters" in cfg
    reloaded = transformers.MiniMaxM2ForCausalLM.from_pretrained(out).eval()
    ids = ids_for(tiny_config, 1)
    with torch.no_grad():
        assert rel_err(reloaded(ids).logits, hf_model(ids).logits) <= 1e-4
        assert rel_err(load_pretrained(out)(ids), hf_model(ids).logits) <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.encode("<think>", add_special_tokens=False) == [M2Tokenizer.tiny().token_to_id("<think>")]


def test_save_names_shapes_and_router_dtype(tiny_model, tmp_path):
    save_pretrained(tiny_model.to(torch.bfloat16), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.block_sparse_moe.experts.3.w2.weight").get_shape() == [128, 128]
        assert f.get_slice("model.layers.1.block_sparse_moe.gate.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.block_sparse_moe.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    assert "model.layers.1.self_attn.q_norm.weight" in keys and "model.norm.weight" in keys
    assert len(keys) == 1 + 2 * (9 + 1 + 8 * 3) + 2


def test_checkpoint_tensors_are_views_with_official_names(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    views = dict(checkpoint_tensors(tiny_model))
    assert views.keys() == on_disk.keys()
    assert all(torch.equal(views[k], on_disk[k]) for k in views)
    w1 = tiny_model.model.layers[1].block_sparse_moe.experts.w1
    assert views["model.layers.1.block_sparse_moe.experts.6.w1.weight"].data_ptr() == w1[6].data_ptr()


def test_softmax_without_bias_export(tmp_path):
    c = M2Config.from_preset("tiny", scoring_func="softmax", use_routing_bias=False)
    model = M2ForCausalLM(c).init_weights(std=0.1, seed=3).eval()
    save_pretrained(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert not any("e_score_correction_bias" in k for k in keys)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["scoring_func"] == "softmax" and cfg["use_routing_bias"] is False
    back = load_pretrained(tmp_path)
    ids = ids_for(c)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def fp8_reference_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent loop-based block quantizer (oracle for the loader's dequantization)."""
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE)
    for i in range(nr):
        for j in range(nc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / s).to(FP8_DTYPE)
    return q, scale


def test_fp8_block_checkpoint_dequantizes(tmp_path):
    # intermediate 160: expert matrices have a partial 128-block
    c = M2Config.from_preset("tiny", intermediate_size=160)
    model = M2ForCausalLM(c).init_weights(std=0.1, seed=4).eval()
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    quantized = {}
    for name, t in list(tensors.items()):
        if t.dim() == 2 and ("proj" in name or ".experts." in name):
            q, s = fp8_reference_quantize(t.float())
            quantized[name] = t.float()
            tensors[name], tensors[name + "_scale_inv"] = q, s
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    loaded = load_pretrained(tmp_path)
    sd = loaded.state_dict()
    w = quantized["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    got = sd["model.layers.1.block_sparse_moe.experts.w2"][5]
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4, plus subnormal spacing near zero
    s = tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight_scale_inv"]
    tol = w.abs() * 2**-4 + s.max() * 2**-9
    assert ((got - w).abs() <= tol).all()
    assert not torch.equal(got, w)  # it really went through FP8
    exact = tensors["model.layers.0.self_attn.q_proj.weight"].float() * \
        tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"].repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :128]
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], exact)
    # an fp8 weight without its scale names the tensor
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        load_pretrained(tmp_path)


def test_mtp_layers_are_skipped_with_warning(tiny_model, tmp_path, caplog):
    save_pretrained(tiny_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(256, 128)  # an MTP layer
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING):
        back = load_pretrained(tmp_path)
    assert "MTP" in caplog.text
    assert len(back.model.layers) == 2


@pytest.mark.parametrize("mutation, pattern", [
    ("drop", r"missing .*model\.layers\.1\.self_attn\.k_norm\.weight"),
    ("reshape", r"model\.layers\.1\.self_attn\.k_norm\.weight has shape \(64,\), expected \(128,\)"),
    ("extra", r"unexpected tensor model\.layers\.0\.mlp\.shared_expert\.weight"),
])
def test_bad_tensors_name_the_tensor(tiny_model, tmp_path, mutation, pattern):
    save_pretrained(tiny_model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.k_norm.weight"
    if mutation == "drop":
        del tensors[name]
    elif mutation == "reshape":
        tensors[name] = torch.ones(64)
    else:
        tensors["model.layers.0.mlp.shared_expert.weight"] = torch.ones(2, 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=pattern):
        load_pretrained(tmp_path)


def test_bad_directories(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path)
    save_pretrained(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mystery_field": 3}))
    with pytest.raises(M2ConfigError, match="mystery_field"):
        load_pretrained(tmp_path)


def test_sharded_roundtrip_bf16(tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert back.model.layers[0].block_sparse_moe.gate.weight.dtype == torch.float32  # router stays fp32
    for (n, a), (_, b) in zip(tiny_model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a.to(b.dtype), b), n


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "incomplete metadata, file not fully covered"),
    ("garbage", "header too large"),
    ("empty", "header too small"),
])
def test_unreadable_safetensors_is_a_checkpoint_error(tiny_model, tmp_path, damage, reason):
    from m2rl.model.checkpoint import verify_pretrained

    save_pretrained(tiny_model, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"garbage!" * 20, "empty": b""}[damage])
    message = f"{weights} is not a readable safetensors file (Error while deserializing header: {reason})"
    for check in (load_pretrained, verify_pretrained):
        with pytest.raises(CheckpointError) as info:
            check(tmp_path)
        assert str(info.value) == message


def test_config_json_that_is_not_text_or_not_an_object(tiny_model, tmp_path):
    from m2rl.model.checkpoint import verify_pretrained

    save_pretrained(tiny_model, tmp_path)
    assert verify_pretrained(tmp_path) == tiny_model.config
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object, got list"):
        verify_pretrained(tmp_path)


@pytest.mark.parametrize("dtype, shard_bytes", [(torch.float32, 5 * 1024**3), (torch.bfloat16, 300_000)])
def test_read_state_dict_gives_back_the_saved_bits(tiny_model, tmp_path, dtype, shard_bytes):
    """What a training checkpoint resumes from: the module state dict (experts stacked) at the stored dtypes,
    bit for bit, the fp32 router of a bf16 model included."""
    from m2rl.model.checkpoint import read_state_dict

    model = tiny_model.to(dtype)
    save_pretrained(model, tmp_path, max_shard_bytes=shard_bytes)
    state = read_state_dict(tmp_path)
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert state["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    fresh = M2ForCausalLM(tiny_model.config).to(dtype)
    fresh.load_state_dict(state)  # strict: every name and shape fits
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing")
