import json

import pytest
from m2rl.model import M2Config, M2ConfigError, M2ForCausalLM

# config.json of MiniMaxAI/MiniMax-M2 (fields as released)
RELEASED = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "vocab_size": 200064,
    "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62, "num_attention_heads": 48,
    "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64, "rope_theta": 5000000,
    "num_local_experts": 256, "num_experts_per_tok": 8, "max_position_embeddings": 196608,
    "shared_intermediate_size": 0, "mtp_transformer_layers": 1, "num_mtp_modules": 3, "hidden_act": "silu",
    "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_qk_norm": True, "use_routing_bias": True,
    "use_mtp": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-06,
    "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False,
    "sliding_window": None, "attn_type_list": [1] * 62, "transformers_version": "4.46.1", "use_cache": True,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
}


def test_released_config_reads_into_m2_preset():
    c = M2Config.from_hf_dict(RELEASED)
    m2 = M2Config.from_preset("m2")
    assert c.rotary_dim == 64 and c.rope_theta == 5e6 and c.partial_rotary_factor == 0.5
    for f in ("hidden_size", "num_hidden_layers", "num_local_experts", "vocab_size", "scoring_func",
              "use_routing_bias", "qk_norm_type", "quantization_config", "num_mtp_modules"):
        assert getattr(c, f) == getattr(m2, f), f


def test_m2_sizes_match_release():
    c = M2Config.from_preset("m2")
    assert 228e9 < c.num_parameters() < 231e9
    assert 9.6e9 < c.num_parameters(active=True, embeddings=False) < 10.0e9
    assert c.kv_bytes_per_token(2) == 2 * 62 * 8 * 128 * 2  # 248 KiB
    assert c.flops_per_token() > 2 * c.num_parameters(active=True, embeddings=False)


def test_presets_sizes():
    mini = M2Config.from_preset("m2-mini")
    assert 1e9 <= mini.num_parameters() <= 2e9
    assert mini.head_dim == 128 and mini.rotary_dim == 64 and mini.vocab_size == 200064
    tiny = M2Config.from_preset("tiny")
    assert tiny.num_parameters() < 10e6
    with pytest.raises(M2ConfigError, match="unknown preset"):
        M2Config.from_preset("huge")


@pytest.mark.parametrize("routing_bias", [True, False])
def test_parameter_count_matches_module(routing_bias):
    c = M2Config.from_preset("tiny", use_routing_bias=routing_bias)
    m = M2ForCausalLM(c)
    counted = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert counted == c.num_parameters()
    per_expert = 3 * c.hidden_size * c.intermediate_size
    inactive = c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * per_expert
    assert c.num_parameters(active=True) == counted - inactive


def test_flops_count_by_hand():
    c = M2Config.from_preset("tiny")
    h, L = c.hidden_size, c.num_hidden_layers
    per_layer = h * c.q_dim * 2 + h * c.kv_dim * 2 + c.num_local_experts * h \
        + c.num_experts_per_tok * 3 * h * c.intermediate_size
    expected = 2 * (L * per_layer + c.vocab_size * h) + 4 * L * c.q_dim * 100
    assert c.flops_per_token(context_len=100) == expected
    assert c.flops_per_token(training=True) == 3 * c.flops_per_token()


def test_hf_dict_roundtrip_and_rope_fields():
    c = M2Config.from_preset("tiny", scoring_func="softmax", use_routing_bias=False)
    d = json.loads(json.dumps(c.to_hf_dict()))
    assert d["rotary_dim"] == 16 and d["partial_rotary_factor"] == 0.5
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert M2Config.from_hf_dict(d) == c


def test_transformers_style_config_without_rotary_dim():
    d = {"model_type": "minimax_m2", "head_dim": 128,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}}
    c = M2Config.from_hf_dict(d)
    assert c.rotary_dim == 64 and c.rope_theta == 5e6


def test_bad_configs_are_clear_errors():
    with pytest.raises(M2ConfigError, match="frobnicate"):
        M2Config.from_hf_dict({**RELEASED, "frobnicate": 1})
    with pytest.raises(M2ConfigError, match="model_type"):
        M2Config.from_hf_dict({"model_type": "llama"})
    with pytest.raises(M2ConfigError, match="scoring_func"):
        M2Config.from_hf_dict({**RELEASED, "scoring_func": "relu"})
    with pytest.raises(M2ConfigError, match="rotary_dim"):
        M2Config.from_hf_dict({**RELEASED, "rotary_dim": 256})
    with pytest.raises(M2ConfigError, match="num_key_value_heads"):
        M2Config.from_hf_dict({**RELEASED, "num_key_value_heads": 7})
    with pytest.raises(M2ConfigError, match="hidden_size"):
        M2Config.from_hf_dict({**RELEASED, "hidden_size": "big"})
    with pytest.raises(M2ConfigError, match="layernorm_mlp_alpha"):
        M2Config.from_hf_dict({**RELEASED, "layernorm_mlp_alpha": 3.5565588200778455})
    assert M2Config.from_hf_dict({**RELEASED, "layernorm_mlp_alpha": 1.0, "postnorm": False}).hidden_size == 3072
    with pytest.raises(M2ConfigError, match="partial_rotary_factor"):
        M2Config.from_hf_dict({**RELEASED, "partial_rotary_factor": 1.0})
