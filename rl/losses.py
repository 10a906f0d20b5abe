"""Policy-gradient losses on [batch, tokens] tensors: CISPO (MiniMax-M1) and the GRPO/DAPO/GSPO baselines.

Symbols (MiniMax-M1 report, section 3.1):
    logprobs      log pi_theta(o_t | ...)   current policy, carries gradient          [B, T]
    old_logprobs  log pi_old(o_t | ...)     policy that the ratio is taken against    [B, T]
    r_t           exp(logprobs - old_logprobs), the token importance ratio
    A_t           advantages, usually the group-relative advantage broadcast to tokens [B, T] (or [B])
    mask          1 on tokens that were sampled by the policy (loss tokens), 0 elsewhere [B, T]

Every loss returns `(loss, metrics)`: `loss` is a scalar to minimise (the negated objective), `metrics`
a dict of detached scalar tensors. Reductions divide by `normalizer`, which defaults to the number of
masked tokens in the call (token-level, "sum over all tokens / total token count"); a learner that splits
a mini-batch into micro-batches passes the mini-batch total so gradients accumulate exactly.

Optional pieces shared by all losses:
- `ref_logprobs` + `kl_coef`: k3 KL penalty against a reference policy (CISPO itself uses none).
- `generator_logprobs` + `tis_cap`: truncated importance sampling, weight
  sg(min(exp(old_logprobs - generator_logprobs), C)), correcting the generator/learner mismatch.
- `entropy`: per-token entropy of pi_theta, only logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossKind = Literal["cispo", "grpo", "dapo", "gspo"]
Aggregation = Literal["token", "sequence"]

# (eps_low, eps_high) per loss when the config leaves them unset.
# - cispo: eps_high 4.0 caps the weight at 5.0 (TRL's recommended absolute cap for CISPO; peers use
#   upper bounds between 1.1 and 6). eps_low 1.0 puts the lower bound at 0, i.e. off: the M1 report
#   tunes only the upper bound. TRL's `epsilon_high` is the absolute cap, so the same setting there is
#   epsilon_high = 1 + eps_high (= 5.0). benchmarks/rl_loss_ablation.py sweeps eps_high.
# - grpo: the PPO default 0.2 on both sides.
# - dapo: clip-higher, 0.2 / 0.28 (DAPO paper).
# - gspo: 3e-4 / 4e-4 on the length-normalised sequence ratio (GSPO paper).
DEFAULT_EPS: dict[str, tuple[float, float]] = {
    "cispo": (1.0, 4.0),
    "grpo": (0.2, 0.2),
    "dapo": (0.2, 0.28),
    "gspo": (3e-4, 4e-4),
}
# How each loss averages by default: token-level for all but GSPO, whose objective is a mean over sequences.
DEFAULT_AGGREGATION: dict[str, Aggregation] = {
    "cispo": "token",
    "grpo": "token",
    "dapo": "token",
    "gspo": "sequence",
}


@dataclass
class LossConfig:
    kind: LossKind = "cispo"
    """The objective: cispo (MiniMax-M1), grpo (PPO-clip), dapo (clip-higher, token-mean) or gspo (sequence ratio)."""
    eps_low: float | None = None  # None: DEFAULT_EPS[kind][0]
    eps_high: float | None = None  # None: DEFAULT_EPS[kind][1]
    aggregation: Aggregation | None = None  # None: DEFAULT_AGGREGATION[kind]
    kl_coef: float = 0.0  # > 0 needs ref_logprobs in the batch; M1 uses no KL term
    tis: bool = False  # truncated importance sampling against the generator's log-probs
    tis_cap: float = 2.0  # C in min(exp(logp_learner_old - logp_generator), C)
    trust_mask: bool = False
    """cispo only: M1's token mask M_it (eq. 5), dropping the gradient of tokens PPO would clip (A > 0 and
    r > 1 + eps_high, or A < 0 and r < 1 - eps_low), a trust region that plain CISPO has none of."""

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_EPS:
            raise ValueError(f"LossConfig.kind must be one of {sorted(DEFAULT_EPS)}, got {self.kind!r}")
        for name in ("eps_low", "eps_high"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"LossConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.aggregation not in (None, "token", "sequence"):
            raise ValueError(
                f"LossConfig.aggregation must be 'token' or 'sequence', got {self.aggregation!r}"
            )
        if not self.kl_coef >= 0:
            raise ValueError(f"LossConfig.kl_coef must be >= 0, got {self.kl_coef!r}")
        if not self.tis_cap > 0:
            raise ValueError(f"LossConfig.tis_cap must be > 0, got {self.tis_cap!r}")
        if self.trust_mask and self.kind != "cispo":
            raise ValueError(f"LossConfig.trust_mask is CISPO's token mask; got kind {self.kind!r}")

    @property
    def eps(self) -> tuple[float, float]:
        low, high = DEFAULT_EPS[self.kind]
        return (
            low if self.eps_low is None else self.eps_low,
            high if self.eps_high is None else self.eps_high,
        )

    @property
    def resolved_aggregation(self) -> Aggregation:
        return DEFAULT_AGGREGATION[self.kind] if self.aggregation is None else self.aggregation


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _check_inputs(logprobs: Tensor, advantages: Tensor, **others: Tensor | None) -> Tensor:
    """Validate shapes; return advantages as [B, T] (a per-sequence [B] advantage is broadcast over T)."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, tokens], got shape {tuple(logprobs.shape)}")
    if advantages.dim() == 1 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    for name, t in {"advantages": advantages, **others}.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)} like logprobs"
            )
    return advantages


def default_normalizer(mask: Tensor, aggregation: Aggregation = "token") -> float:
    """Masked-token count (token level) or number of sequences with at least one masked token."""
    if aggregation == "token":
        return float(mask.sum().item())
    return float((mask.sum(dim=-1) > 0).sum().item())


def aggregate(per_token: Tensor, mask: Tensor, aggregation: Aggregation, normalizer: float | None) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token:    sum_{i,t} m_it x_it / N, N = all masked tokens (of the mini-batch when micro-batching).
    sequence: sum_i (sum_t m_it x_it / |o_i|) / G, G = sequences with masked tokens.
    An empty mask gives 0 (with a graph, so backward still works).
    """
    if normalizer is None:
        normalizer = default_normalizer(mask, aggregation)
    if aggregation == "token":
        total = (per_token * mask).sum()
    else:
        lengths = mask.sum(dim=-1)
        total = ((per_token * mask).sum(dim=-1) / lengths.clamp(min=1)).sum()
    return total / max(normalizer, 1.0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    if not bool(mask.any()):
        return x.new_zeros(())
    return x.masked_fill(mask == 0, -math.inf).max()


def _masked_min(x: Tensor, mask: Tensor) -> Tensor:
    if not bool(mask.any()):
        return x.new_zeros(())
    return x.masked_fill(mask == 0, math.inf).min()


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def tis_weights(old_logprobs: Tensor, generator_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance weight min(exp(logp_learner_old - logp_generator), cap), detached."""
    return torch.exp(old_logprobs - generator_logprobs).clamp(max=cap).detach()


def _finish(
    per_token: Tensor,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    aggregation: Aggregation,
    normalizer: float | None,
    weight: Tensor,
    ref_logprobs: Tensor | None,
    kl_coef: float,
    entropy: Tensor | None,
    metrics: dict[str, Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Apply TIS weight and KL term, reduce, and add the metrics every loss reports."""
    mask = mask.to(logprobs.dtype)
    per_token = per_token * weight
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's per-token log-probs)")
        kl_ref = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl_ref
        metrics["kl_ref"] = _masked_mean(kl_ref.detach(), mask)
    loss = aggregate(per_token, mask, aggregation, normalizer)
    with torch.no_grad():
        metrics["loss"] = loss.detach()
        metrics["approx_kl"] = _masked_mean(k3_kl(logprobs.detach(), old_logprobs), mask)
        metrics["tis_weight_mean"] = _masked_mean(weight, mask)
        metrics["num_tokens"] = mask.sum()
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy.detach(), mask)
    return loss, metrics


def _token_ratio_metrics(ratio: Tensor, mask: Tensor, low: float, high: float) -> dict[str, Tensor]:
    ratio = ratio.detach()
    mask = mask.to(ratio.dtype)
    return {
        "clip_frac_low": _masked_mean((ratio < low).to(ratio.dtype), mask),
        "clip_frac_high": _masked_mean((ratio > high).to(ratio.dtype), mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_max": _masked_max(ratio, mask),
        "ratio_min": _masked_min(ratio, mask),
    }


def _tis(old_logprobs: Tensor, generator_logprobs: Tensor | None, tis_cap: float | None) -> Tensor:
    if tis_cap is None or generator_logprobs is None:
        if tis_cap is not None:
            raise ValueError("tis_cap is set but generator_logprobs is None")
        return torch.ones_like(old_logprobs)
    return tis_weights(old_logprobs, generator_logprobs, tis_cap)


# ---------------------------------------------------------------------------------------------------------
# losses


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = DEFAULT_EPS["cispo"][0],
    eps_high: float = DEFAULT_EPS["cispo"][1],
    *,
    normalizer: float | None = None,
    aggregation: Aggregation = "token",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    generator_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    entropy: Tensor | None = None,
    trust_mask: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: J = 1/N sum_{i,t} sg(clip(r_it, 1-eps_low, 1+eps_high)) * A_it * log pi_theta(o_it).

    The clipped ratio is a constant weight, so a clipped token still gets gradient w * A / N on its
    log-prob (PPO-style clipping would zero it). `trust_mask`: multiply by M1's M_it, 0 where PPO's clip
    would remove the gradient (A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low), else 1.
    """
    advantages = _check_inputs(logprobs, advantages, old_logprobs=old_logprobs, mask=mask)
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    low, high = 1.0 - eps_low, 1.0 + eps_high
    weight_is = ratio.clamp(min=low, max=high)  # already detached: sg(clip(r))
    per_token = -weight_is * advantages * logprobs
    metrics = _token_ratio_metrics(ratio, mask, low, high)
    if trust_mask:
        outside = ((advantages > 0) & (ratio > high)) | ((advantages < 0) & (ratio < low))
        per_token = per_token * (~outside).to(per_token.dtype)
        metrics["trust_masked_frac"] = _masked_mean(outside.to(ratio.dtype), mask)
    metrics["is_weight_mean"] = _masked_mean(weight_is, mask)
    metrics["is_weight_max"] = _masked_max(weight_is, mask)
    metrics["is_weight_min"] = _masked_min(weight_is, mask)
    weight = _tis(old_logprobs, generator_logprobs, tis_cap)
    return _finish(
        per_token,
        logprobs,
        old_logprobs,
        mask,
        aggregation,
        normalizer,
        weight,
        ref_logprobs,
        kl_coef,
        entropy,
        metrics,
    )


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = DEFAULT_EPS["grpo"][0],
    eps_high: float = DEFAULT_EPS["grpo"][1],
    *,
    normalizer: float | None = None,
    aggregation: Aggregation = "token",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    generator_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip per token: J = 1/N sum min(r A, clip(r, 1-eps_low, 1+eps_high) A).

    Where the clipped branch is the minimum, the term is constant in theta: that token gets no gradient.
    """
    advantages = _check_inputs(logprobs, advantages, old_logprobs=old_logprobs, mask=mask)
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    low, high = 1.0 - eps_low, 1.0 + eps_high
    unclipped = ratio * advantages
    clipped = ratio.clamp(min=low, max=high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    metrics = _token_ratio_metrics(ratio, mask, low, high)
    with torch.no_grad():
        # Tokens whose gradient the clip removed (CleanRL's clipfrac counts |r - 1| > eps instead).
        metrics["clip_frac_effective"] = _masked_mean((clipped < unclipped).to(ratio.dtype), mask)
        metrics["is_weight_mean"] = metrics["ratio_mean"]
        metrics["is_weight_max"] = metrics["ratio_max"]
        metrics["is_weight_min"] = metrics["ratio_min"]
    weight = _tis(old_logprobs, generator_logprobs, tis_cap)
    return _finish(
        per_token,
        logprobs,
        old_logprobs,
        mask,
        aggregation,
        normalizer,
        weight,
        ref_logprobs,
        kl_coef,
        entropy,
        metrics,
    )


def dapo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = DEFAULT_EPS["dapo"][0],
    eps_high: float = DEFAULT_EPS["dapo"][1],
    **kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO: token-level PPO-clip with clip-higher (decoupled eps_low 0.2 / eps_high 0.28)."""
    return grpo_loss(logprobs, old_logprobs, advantages, mask, eps_low, eps_high, **kwargs)


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = DEFAULT_EPS["gspo"][0],
    eps_high: float = DEFAULT_EPS["gspo"][1],
    *,
    normalizer: float | None = None,
    aggregation: Aggregation = "sequence",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    generator_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: sequence ratio s_i = exp(1/|o_i| sum_t (logp_it - old_it)), the geometric mean of token ratios.

    J = 1/G sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i). Written in the GSPO-token form
    s_it = sg(s_i) * pi_it / sg(pi_it), whose value is s_i and whose gradient equals GSPO's when A_it = A_i,
    so per-token advantages also work.
    """
    advantages = _check_inputs(logprobs, advantages, old_logprobs=old_logprobs, mask=mask)
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(dim=-1).clamp(min=1)
    log_seq_ratio = ((logprobs - old_logprobs) * mask).sum(dim=-1) / lengths  # [B]
    seq_ratio = torch.exp(log_seq_ratio)
    token_ratio = seq_ratio.detach().unsqueeze(-1) * torch.exp(logprobs - logprobs.detach())  # [B, T]
    low, high = 1.0 - eps_low, 1.0 + eps_high
    unclipped = token_ratio * advantages
    clipped = token_ratio.clamp(min=low, max=high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        has_tokens = (mask.sum(dim=-1) > 0).to(logprobs.dtype)
        s = seq_ratio.detach()
        metrics = {
            "clip_frac_low": _masked_mean((s < low).to(s.dtype), has_tokens),
            "clip_frac_high": _masked_mean((s > high).to(s.dtype), has_tokens),
            "ratio_mean": _masked_mean(s, has_tokens),
            "ratio_max": _masked_max(s, has_tokens),
            "ratio_min": _masked_min(s, has_tokens),
        }
        metrics["is_weight_mean"] = metrics["ratio_mean"]
        metrics["is_weight_max"] = metrics["ratio_max"]
        metrics["is_weight_min"] = metrics["ratio_min"]
    weight = _tis(old_logprobs, generator_logprobs, tis_cap)
    return _finish(
        per_token,
        logprobs,
        old_logprobs,
        mask,
        aggregation,
        normalizer,
        weight,
        ref_logprobs,
        kl_coef,
        entropy,
        metrics,
    )


LOSSES = {"cispo": cispo_loss, "grpo": grpo_loss, "dapo": dapo_loss, "gspo": gspo_loss}


def policy_loss(
    config: LossConfig,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    normalizer: float | None = None,
    ref_logprobs: Tensor | None = None,
    generator_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on `config.kind` with the configured clip range, aggregation, KL and TIS settings."""
    eps_low, eps_high = config.eps
    if config.tis and generator_logprobs is None:
        raise ValueError("LossConfig.tis is on but no generator_logprobs were given")
    return LOSSES[config.kind](
        logprobs,
        old_logprobs,
        advantages,
        mask,
        eps_low,
        eps_high,
        normalizer=normalizer,
        aggregation=config.resolved_aggregation,
        ref_logprobs=ref_logprobs,
        kl_coef=config.kl_coef,
        generator_logprobs=generator_logprobs if config.tis else None,
        tis_cap=config.tis_cap if config.tis else None,
        entropy=entropy,
        **({"trust_mask": True} if config.trust_mask else {}),
    )
