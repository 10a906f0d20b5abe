"""M2Config: every field of MiniMax-M2's Hugging Face `config.json`, named presets, and size accounting.

The forward pass reads only the structural fields; the rest (MTP, aux-loss, FP8 quantization ...) are
kept so a checkpoint's config round-trips. Unknown fields are an error: a silently ignored field is how
a model gets the wrong architecture.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class M2ConfigError(ValueError):
    """A config.json is not a MiniMax-M2 config this code can run (unknown, missing or unsupported field)."""


# HF bookkeeping fields that never change the network; accepted and dropped.
_IGNORED_HF_FIELDS = frozenset({
    "transformers_version", "auto_map", "_name_or_path", "use_cache", "output_router_logits",
    "initializer_range", "attention_dropout", "router_jitter_noise", "torch_dtype", "dtype",
    "output_attentions", "output_hidden_states", "return_dict", "pad_token_id", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "id2label", "label2id", "tokenizer_class", "_attn_implementation",
    "shared_moe_mode", "attn_window_size", "swa_rope_theta", "block_size",
})
# MiniMax-01-style fields accepted only at the value that makes them a no-op in M2 (plain pre-norm residuals).
_NO_OP_FIELDS: dict[str, object] = {
    **{f"layernorm_{k}_{ab}": 1.0 for k in ("full_attention", "linear_attention", "mlp") for ab in ("alpha", "beta")},
    **{f"{k}_{ab}_factor": 1.0 for k in ("full_attn", "linear_attn", "mlp") for ab in ("alpha", "beta")},
    "postnorm": False,
}


@dataclass
class M2Config:
    # sizes
    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536  # per expert (SwiGLU inner width)
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 196608
    # attention
    rotary_dim: int = 64  # partial NeoX RoPE: the first rotary_dim dims of each head rotate
    rope_theta: float = 5_000_000.0
    use_qk_norm: bool = True
    qk_norm_type: str = "per_layer"  # one RMSNorm over the whole q (and k) projection, before the head split
    rms_norm_eps: float = 1e-6
    # MoE
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    scoring_func: str = "sigmoid"  # "sigmoid" (released) or "softmax" (what vLLM's CPU MoE supports)
    use_routing_bias: bool = True  # e_score_correction_bias: used to choose experts, never to weight them
    shared_intermediate_size: int = 0  # M2 has no shared expert
    router_aux_loss_coef: float = 0.001
    # head / embeddings
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # multi-token prediction (weights never released: loaders skip layers >= num_hidden_layers)
    use_mtp: bool = True
    num_mtp_modules: int = 3
    mtp_transformer_layers: int = 1
    # special tokens of the released tokenizer (the tiny preset uses its own tokenizer's ids)
    bos_token_id: int | None = 200034
    eos_token_id: int | list[int] | None = 200020
    # FP8 block quantization of the released weights; None for unquantized checkpoints
    quantization_config: dict[str, Any] | None = None
    attn_type_list: list[int] | None = None  # all 1 (full attention) in M2
    sliding_window: int | None = None
    architectures: list[str] = field(default_factory=lambda: ["MiniMaxM2ForCausalLM"])
    model_type: str = "minimax_m2"

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise M2ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"config field {name} must be a positive integer, got {value!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary_dim must be even and in (0, head_dim={self.head_dim}], got {self.rotary_dim}")
        need(self.num_experts_per_tok <= self.num_local_experts,
             f"num_experts_per_tok ({self.num_experts_per_tok}) > num_local_experts ({self.num_local_experts})")
        need(self.scoring_func in ("sigmoid", "softmax"),
             f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        need(self.qk_norm_type == "per_layer",
             f"qk_norm_type {self.qk_norm_type!r} is not supported (M2 uses 'per_layer')")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (M2 uses 'silu')")
        need(self.shared_intermediate_size in (0, [0], None),
             f"shared experts are not part of M2 (shared_intermediate_size={self.shared_intermediate_size})")
        need(not self.tie_word_embeddings, "M2 has an untied lm_head; tie_word_embeddings must be false")
        need(self.sliding_window is None, "M2 uses full attention; sliding_window must be null")
        need(self.attn_type_list is None or all(t == 1 for t in self.attn_type_list),
             "attn_type_list: only full attention (1) is part of M2")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.quantization_config is not None:
            q = self.quantization_config
            need(isinstance(q, dict) and q.get("quant_method") == "fp8",
                 f"quantization_config: only quant_method 'fp8' is supported, got {q!r}")
            need(q.get("fmt", "float8_e4m3fn") in ("float8_e4m3fn", "e4m3"),
                 f"quantization_config.fmt {q.get('fmt')!r} is not supported (float8_e4m3fn only)")
            need(len(q.get("weight_block_size", [128, 128])) == 2,
                 f"quantization_config.weight_block_size must have 2 entries, got {q.get('weight_block_size')}")

    # ---- derived shapes ---------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def partial_rotary_factor(self) -> float:
        return self.rotary_dim / self.head_dim

    # ---- Hugging Face config.json -----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> M2Config:
        if not isinstance(d, dict):
            raise M2ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type", "minimax_m2")
        if model_type not in ("minimax_m2", "minimax"):
            raise M2ConfigError(f"model_type {model_type!r} is not MiniMax-M2 ('minimax_m2')")
        d["model_type"] = "minimax_m2"
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        factor = d.pop("partial_rotary_factor", rope.get("partial_rotary_factor"))
        if rope.get("rope_type", "default") not in ("default", None):
            raise M2ConfigError(f"rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
        head_dim = d.get("head_dim", cls.head_dim)
        if "rotary_dim" not in d:
            # transformers' native config has no rotary_dim; without a factor it rotates every dim.
            d["rotary_dim"] = round(head_dim * (factor if factor is not None else 1.0))
        elif factor is not None and abs(d["rotary_dim"] - head_dim * factor) > 1e-6:
            raise M2ConfigError(f"rotary_dim {d['rotary_dim']} disagrees with partial_rotary_factor {factor} "
                                f"(head_dim {head_dim})")
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        for key, neutral in _NO_OP_FIELDS.items():
            if key in d and d.pop(key) != neutral:
                raise M2ConfigError(f"config field {key} must be {neutral} for MiniMax-M2 (MiniMax-01 residual "
                                    f"scaling / post-norm is not part of M2)")
        layer_types = d.pop("layer_types", None)
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise M2ConfigError("layer_types: only 'full_attention' layers are part of MiniMax-M2")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _IGNORED_HF_FIELDS)
        if unknown:
            raise M2ConfigError(f"unknown MiniMax-M2 config fields: {unknown}")
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_theta") is not None:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        return cls(**kwargs)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        for key in ("attn_type_list", "sliding_window"):
            if d[key] is None:
                del d[key]
        # vLLM reads rotary_dim/partial_rotary_factor; transformers reads rope_parameters.
        d["partial_rotary_factor"] = self.partial_rotary_factor
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor}
        d["torch_dtype"] = torch_dtype
        d["dtype"] = torch_dtype
        return dict(sorted(d.items()))

    # ---- presets ----------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> M2Config:
        if name not in PRESETS:
            raise M2ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(copy.deepcopy(PRESETS[name]), **overrides)

    # ---- accounting -------------------------------------------------------------------------------
    def num_parameters(self, active: bool = False, embeddings: bool = True) -> int:
        """Parameter count; `active` counts only the top-k experts a token uses. `embeddings` includes
        the input embedding and the lm_head."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h
        norms = 2 * h + (self.q_dim + self.kv_dim if self.use_qk_norm else 0)
        router = self.num_local_experts * h + (self.num_local_experts if self.use_routing_bias else 0)
        experts = (self.num_experts_per_tok if active else self.num_local_experts) * 3 * h * i
        total = self.num_hidden_layers * (attn + norms + router + experts) + h
        if embeddings:
            total += 2 * self.vocab_size * h
        return total

    def flops_per_token(self, context_len: int = 0, training: bool = False) -> int:
        """Matmul FLOPs for one token attending to `context_len` earlier tokens (forward; x3 when training).
        Counts 2 FLOPs per multiply-add of every active weight (router and lm_head included, the
        embedding lookup excluded) plus QK^T and AV."""
        h = self.hidden_size
        weights = self.num_parameters(active=True, embeddings=False) - self.num_hidden_layers * (
            2 * h + (self.q_dim + self.kv_dim if self.use_qk_norm else 0)
            + (self.num_local_experts if self.use_routing_bias else 0)) - h
        matmul = 2 * (weights + self.vocab_size * h)
        attention = 4 * self.num_hidden_layers * self.q_dim * context_len
        return (matmul + attention) * (3 if training else 1)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.kv_dim * dtype_bytes


PRESETS: dict[str, M2Config] = {
    # The released MiniMax-M2 (229B total, ~10B active).
    "m2": M2Config(quantization_config={
        "quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
    }),
    # Same structure (head_dim 128, rotary 64, sigmoid top-8 routing, real vocab), ~1.7B total: one GPU.
    "m2-mini": M2Config(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                        num_local_experts=64, num_experts_per_tok=8, intermediate_size=512, use_mtp=False,
                        num_mtp_modules=0),
    # Every structural feature, ~2M parameters: CPU tests. vocab = the committed tiny tokenizer's.
    "tiny": M2Config(vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=32, rotary_dim=16,
                     rope_theta=10000.0, num_local_experts=8, num_experts_per_tok=2,
                     max_position_embeddings=4096, use_mtp=False, num_mtp_modules=0,
                     bos_token_id=0, eos_token_id=2),
}


def describe(config: M2Config) -> str:
    total, active = config.num_parameters(), config.num_parameters(active=True)
    return (f"params total {total / 1e9:.3f}B active {active / 1e9:.3f}B, "
            f"{config.flops_per_token() / 1e9:.2f} GFLOP/token, "
            f"KV {config.kv_bytes_per_token() / 1024:.0f} KiB/token (bf16), "
            f"layers {config.num_hidden_layers}, experts {config.num_experts_per_tok}/{config.num_local_experts}, "
            f"log2(vocab) {math.log2(config.vocab_size):.1f}")
