"""The learner: one `update(batch)` per rollout batch, several optimizer steps inside it.

Per update:
  1. optionally recompute pi_old with the learner (no grad) and log the generator/learner log-prob gap;
  2. for each epoch, split the sequences into `mini_batches` (one optimizer step each);
  3. pack each mini-batch into micro-batches of at most `micro_batch_tokens` (real tokens, laid end to end
     with `packing`; else rows x longest row, right-padded), and accumulate gradients; the loss normaliser
     is the MINI-BATCH total
     (masked tokens, or sequences for sequence aggregation), so the accumulated gradient equals the
     gradient of the whole mini-batch in one piece;
  4. clip the global grad norm, AdamW step (betas 0.9/0.95, eps 1e-15 as in M1), LR scheduler step.

Data-parallel (`parallel=DataParallel`, rl/distributed.py): every rank gets the same batch and the same
mini-batches; each backpropagates its share of a mini-batch's rows (split by tokens) with the loss divided
by the mini-batch's global normaliser, FSDP2 sums the gradients, and the metrics are reduced over the ranks,
so an update equals the one-process update. `SingleProcess` (the default) makes every reduction the identity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from m2rl.rl.batch import RolloutBatch
from m2rl.rl.distributed import SingleProcess
from m2rl.rl.logprobs import policy_token_logprobs
from m2rl.rl.losses import LossConfig, policy_loss
from m2rl.rl.lr_schedule import LRScheduleConfig, build_lr_scheduler
from m2rl.rl.packing import pack, packed_token_logprobs, supports_packing, unpack
from torch import Tensor, nn

__all__ = ["Learner", "LearnerConfig", "RolloutBatch", "pack_micro_batches"]


@dataclass
class LearnerConfig:
    """AdamW, micro-batching and epochs of the learner (`learner.*` in the train config)."""

    lr: float = 1e-6
    """Peak learning rate of AdamW (the LR schedule scales it)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2); 0.95 as in MiniMax-M1."""
    adam_eps: float = 1e-15
    """AdamW epsilon; M1 uses 1e-15 so tiny second moments are not drowned by it."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay."""
    max_grad_norm: float | None = 1.0
    """Global gradient-norm clip; null: no clipping (the norm is still logged)."""
    micro_batch_tokens: int = 16384
    """Tokens per forward/backward (real tokens with packing, else rows x longest row); bounds activation
    memory. A row longer than this gets a micro-batch of its own."""
    packing: bool = True
    """Lay each micro-batch's rows end to end with no padding (attention and positions per row, see
    rl/packing.py); same log-probs, loss and gradients as padded rows, without computing the padding.
    M2 policies only: other models (and a custom logprob_fn) always take right-padded rows."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the rollout batch is split into this many mini-batches."""
    epochs: int = 1
    """Passes over the rollout batch; more than 1 makes the later optimizer steps off-policy."""
    shuffle: bool = True
    """Reshuffle sequences into mini-batches each epoch (seeded by seed and update count, so resume-safe)."""
    seed: int = 0
    """Seed of the mini-batch shuffle."""
    bf16: bool = False
    """Autocast the forward pass to bfloat16."""
    lm_head_fp32: bool = True
    """Compute the LM head in fp32 (M1: raised train/inference probability correlation 0.987 -> 0.997)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    recompute_old_logprobs: bool = True
    """Take pi_old from the learner rather than the generator (needed by loss.tis)."""
    compute_entropy: bool = True
    """Compute the per-token entropy of the policy (logged only)."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk of the LM head when computing log-probs (never the whole [B*T, V] logits at once)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The policy loss: CISPO or a GRPO/DAPO/GSPO baseline."""
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """Learning-rate schedule over optimizer steps."""

    def __post_init__(self) -> None:
        # Value checks only: keys and types are checked by m2rl.config when the config is loaded.
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.lr >= 0:
            raise ValueError(f"LearnerConfig.lr must be >= 0, got {self.lr}")
        if self.micro_batch_tokens < 1:
            raise ValueError(f"LearnerConfig.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.mini_batches < 1 or self.epochs < 1:
            raise ValueError(f"mini_batches and epochs must be >= 1, got {self.mini_batches}, {self.epochs}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"LearnerConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.loss.tis and not self.recompute_old_logprobs:
            raise ValueError(
                "loss.tis needs recompute_old_logprobs=True (TIS compares learner and generator pi_old)"
            )


def pack_micro_batches(lengths: list[int], token_budget: int, packed: bool = False) -> list[list[int]]:
    """Group row indices so each group's size is <= token_budget: its padded size len(group) * max(length),
    or with `packed` its real tokens sum(length).

    Longest rows first, greedy (packed: into the first group with room); a row longer than the budget gets
    a micro-batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    if packed:
        sizes: list[int] = []
        for i in order:
            room = next((g for g, size in enumerate(sizes) if size + lengths[i] <= token_budget), None)
            if room is None:
                groups.append([i])
                sizes.append(lengths[i])
            else:
                groups[room].append(i)
                sizes[room] += lengths[i]
        return groups
    for i in order:
        # rows arrive longest first, so a group's first row is its longest
        if groups and (len(groups[-1]) + 1) * max(1, lengths[groups[-1][0]]) <= token_budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# How each metric combines over micro-batches and optimizer steps, named metric by metric: these keep
# their extreme; every other metric is a weighted mean (by tokens over micro-batches, by step over steps).
METRIC_EXTREMES: dict[str, Callable[[float, float], float]] = {
    "ratio_max": max,  # losses.py: the largest importance ratio of the update
    "ratio_min": min,
    "is_weight_max": max,  # losses.py: the largest (truncated) importance-sampling weight
    "is_weight_min": min,
    "grad_norm_max": max,  # the largest gradient norm over the update's optimizer steps
}


class _MetricMean:
    """Weighted means, except the `METRIC_EXTREMES`, which keep their extreme."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.extremes: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Tensor | float], weight: float) -> None:
        for key, value in metrics.items():
            v = float(value)
            extreme = METRIC_EXTREMES.get(key)
            if extreme is not None:
                self.extremes[key] = extreme(self.extremes[key], v) if key in self.extremes else v
            elif weight > 0:
                self.sums[key] = self.sums.get(key, 0.0) + v * weight
                self.weights[key] = self.weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.weights[k] for k in self.sums}
        out.update(self.extremes)
        return out

    @classmethod
    def merged(cls, parts: list[_MetricMean]) -> _MetricMean:
        """The means and extremes of all `parts` together (e.g. one per data-parallel rank)."""
        out = cls()
        for part in parts:
            for key, value in part.sums.items():
                out.sums[key] = out.sums.get(key, 0.0) + value
                out.weights[key] = out.weights.get(key, 0.0) + part.weights[key]
            for key, value in part.extremes.items():
                out.extremes[key] = METRIC_EXTREMES[key](out.extremes[key], value) if key in out.extremes else value
        return out


LogprobFn = Callable[..., Tensor | tuple[Tensor, Tensor]]


class Learner:
    """Holds the policy, AdamW and the LR scheduler; `update(batch) -> metrics`."""

    def __init__(
        self, model: nn.Module, config: LearnerConfig | None = None, logprob_fn: LogprobFn | None = None,
        parallel: SingleProcess | None = None,
    ):
        self.parallel = parallel or SingleProcess()
        # FSDP2 shards the parameters in place; the optimizer below must hold the sharded ones
        model = self.parallel.shard(model)
        self.model = model
        self.config = config or LearnerConfig()
        self.logprob_fn = logprob_fn or policy_token_logprobs
        # packing needs the M2 attention's cu_seqlens; a custom logprob_fn gets the padded rows it expects
        self.packing = self.config.packing and logprob_fn is None and supports_packing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params,
            lr=self.config.lr,
            betas=self.config.betas,
            eps=self.config.adam_eps,
            weight_decay=self.config.weight_decay,
        )
        self.scheduler = build_lr_scheduler(self.optimizer, self.config.lr_schedule)
        self._token_ratios: list[Tensor] = []  # of the update in progress (`_ratio_percentiles`)
        self.update_count = 0  # rollout batches consumed; seeds the mini-batch shuffle
        self.optimizer_steps = 0
        if self.config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)

    # -- state (the optimizer and scheduler are saved by rl.checkpoint next to this) --
    def state_dict(self) -> dict[str, int]:
        return {"update_count": self.update_count, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.update_count = int(state["update_count"])
        self.optimizer_steps = int(state["optimizer_steps"])

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _logprobs(
        self, batch: RolloutBatch, rows: list[int], lengths: list[int], with_entropy: bool
    ) -> tuple[Tensor, Tensor | None, int]:
        """Forward on `rows` trimmed to their longest length: ([b, L] logprobs, entropy or None, L)."""
        idx = torch.tensor(rows, device=batch.input_ids.device)
        longest = max(lengths[r] for r in rows)
        length = max(1, longest)
        if self.packing and longest > 0:
            return self._packed_logprobs(batch, rows, length, with_entropy)
        ids = batch.input_ids[idx, :length]
        attn = batch.attention_mask[idx, :length] if batch.attention_mask is not None else None
        # Only loss tokens need log-probs: the head is skipped on prompt and env tokens.
        target = batch.loss_mask[idx, :length]
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            out = self.logprob_fn(
                self.model,
                ids,
                attention_mask=attn,
                return_entropy=with_entropy,
                chunk_size=self.config.logprob_chunk_size,
                lm_head_fp32=self.config.lm_head_fp32,
                target_mask=target,
            )
        if with_entropy:
            logprobs, entropy = out
            return logprobs, entropy.detach(), length
        return out, None, length

    def _packed_logprobs(
        self, batch: RolloutBatch, rows: list[int], length: int, with_entropy: bool
    ) -> tuple[Tensor, Tensor | None, int]:
        """`_logprobs` through one packed forward of the rows' real tokens, unpacked to [b, L]."""
        packed = pack(batch, rows)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            out = packed_token_logprobs(
                self.model,
                packed,
                return_entropy=with_entropy,
                chunk_size=self.config.logprob_chunk_size,
                lm_head_fp32=self.config.lm_head_fp32,
                target_mask=packed.loss_mask,
            )
        if with_entropy:
            logprobs, entropy = out
            return unpack(logprobs, packed, length), unpack(entropy.detach(), packed, length), length
        return unpack(out, packed, length), None, length

    def _idle_pass(self, batch: RolloutBatch, backward: bool) -> None:
        """A zero-loss forward (and backward) on two tokens: a data-parallel rank with fewer micro-batches
        than another still joins each of FSDP's all-gathers and reduce-scatters, which are collectives."""
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            out = self.logprob_fn(self.model, batch.input_ids[:1, :2], chunk_size=self.config.logprob_chunk_size,
                                  lm_head_fp32=self.config.lm_head_fp32)
        if backward:
            assert isinstance(out, Tensor)
            (out.sum() * 0.0).backward()

    @torch.no_grad()
    def recompute_logprobs(self, batch: RolloutBatch) -> Tensor:
        """Learner log-probs [B, T] of the batch under the current parameters (0 past each row's length).
        Data-parallel: each rank computes its share of the rows, and the shares are summed."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
        lengths = batch.lengths()
        local = self.parallel.local_rows(list(range(len(lengths))), lengths)
        micros = pack_micro_batches([lengths[r] for r in local], self.config.micro_batch_tokens, packed=self.packing)
        for k in range(self.parallel.max_count(len(micros))):
            if k >= len(micros):
                self._idle_pass(batch, backward=False)
                continue
            rows = [local[i] for i in micros[k]]
            logprobs, _, length = self._logprobs(batch, rows, lengths, with_entropy=False)
            out = out.to(logprobs.dtype)
            out[torch.tensor(rows, device=out.device), :length] = logprobs
        self.parallel.reshard(self.model)
        return self.parallel.sum_(out)

    def compute_gradients(
        self, batch: RolloutBatch, rows: list[int] | None = None, old_logprobs: Tensor | None = None
    ) -> dict[str, float]:
        """Accumulate into .grad the gradient of the loss of the mini-batch `rows` (default: all rows),
        micro-batch by micro-batch. `old_logprobs` default to the batch's (generator) log-probs."""
        cfg = self.config
        rows = list(range(batch.input_ids.shape[0])) if rows is None else rows
        old_logprobs = batch.old_logprobs if old_logprobs is None else old_logprobs
        aggregation = cfg.loss.resolved_aggregation
        rows_t = torch.tensor(rows, device=batch.loss_mask.device)
        lengths = batch.lengths()
        acc = _MetricMean()
        loss_total = 0.0
        # Rows without loss tokens add nothing to the loss or its gradient: no forward for them (a micro-batch
        # of only such rows would have no graph to backpropagate, and would report its extremes as 0).
        has_loss = batch.loss_mask.bool().any(dim=1).tolist()
        live = self.parallel.local_rows([r for r in rows if has_loss[r]], lengths)
        # The mini-batch's normaliser over every rank's rows: the ranks' gradients sum to the one-process one.
        live_t = torch.tensor(live, dtype=torch.long, device=rows_t.device)
        normalizer = self.parallel.normalizer(batch.loss_mask[live_t], aggregation)
        micros = pack_micro_batches([lengths[r] for r in live], cfg.micro_batch_tokens, packed=self.packing)
        for k in range(self.parallel.max_count(len(micros))):
            if k >= len(micros):
                self._idle_pass(batch, backward=True)
                continue
            sub = [live[i] for i in micros[k]]
            logprobs, entropy, length = self._logprobs(batch, sub, lengths, with_entropy=cfg.compute_entropy)
            idx = torch.tensor(sub, device=batch.input_ids.device)
            mask = batch.loss_mask[idx, :length].to(logprobs.dtype)
            # Log-probs under the generator that sampled the tokens; `old` (pi_old of the ratio) may be the
            # learner's recomputation instead.
            generator_logprobs = batch.old_logprobs[idx, :length].to(logprobs.dtype)
            old = old_logprobs[idx, :length].to(logprobs.dtype)
            loss, metrics = policy_loss(
                cfg.loss,
                logprobs,
                old,
                batch.advantages[idx, :length].to(logprobs.dtype),
                mask,
                normalizer=normalizer,
                ref_logprobs=batch.ref_logprobs[idx, :length].to(logprobs.dtype)
                if batch.ref_logprobs is not None
                else None,
                generator_logprobs=generator_logprobs,
                entropy=entropy,
            )
            loss.backward()
            loss_total += float(metrics.pop("loss"))
            n_tokens = float(metrics.pop("num_tokens"))
            with torch.no_grad():
                metrics["logp_gap_gen_current"] = (
                    (generator_logprobs - logprobs.detach()).abs() * mask
                ).sum() / mask.sum().clamp(min=1)
            acc.add(metrics, n_tokens)
            # Every loss token's ratio pi_theta / pi_old, for the percentiles `update` reports (not a mean).
            self._token_ratios.append(torch.exp(logprobs.detach() - old)[mask.bool()].float().cpu())
        out = _MetricMean.merged(self.parallel.gather(acc)).result()
        out["loss"] = self.parallel.sum(loss_total)
        out["num_tokens"] = float(batch.loss_mask[rows_t].sum())
        return out

    def update(self, batch: RolloutBatch | Mapping[str, Tensor]) -> dict[str, float]:
        cfg = self.config
        if not isinstance(batch, RolloutBatch):
            batch = RolloutBatch.from_mapping(batch)
        batch.validate()
        batch = RolloutBatch(
            **{
                f.name: (
                    getattr(batch, f.name).to(self.device) if getattr(batch, f.name) is not None else None
                )
                for f in fields(batch)
            }
        )
        start = time.perf_counter()
        self.model.train()
        self._token_ratios = []
        metrics = _MetricMean()
        extra: dict[str, float] = {}
        mask = batch.loss_mask.float()
        if cfg.recompute_old_logprobs:
            old_logprobs = self.recompute_logprobs(batch)
            gap = (
                (batch.old_logprobs.to(old_logprobs.dtype) - old_logprobs).abs() * mask
            ).sum() / mask.sum().clamp(min=1)
            extra["logp_gap_gen_learner"] = float(gap)
        else:
            old_logprobs = batch.old_logprobs
        n_rows = batch.input_ids.shape[0]
        lengths = batch.lengths()
        forward_tokens = 0
        skipped = 0
        for epoch in range(cfg.epochs):
            if cfg.shuffle:
                shuffle_rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.update_count * 1009 + epoch)
                order = torch.randperm(n_rows, generator=shuffle_rng).tolist()
            else:
                order = list(range(n_rows))
            for rows in _split(order, cfg.mini_batches):
                if not rows:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                step_metrics = self.compute_gradients(batch, rows, old_logprobs)
                forward_tokens += sum(lengths[r] for r in rows)
                grad_norm = self.parallel.clip_grad_norm(self.params, cfg.max_grad_norm or math.inf)
                step_metrics["grad_norm"] = float(grad_norm)
                step_metrics["grad_norm_max"] = float(grad_norm)
                if step_metrics["num_tokens"] == 0 or not math.isfinite(float(grad_norm)):
                    # nothing to learn from, or a non-finite gradient: do not let it touch the weights
                    # (nor advance the LR schedule, which counts optimizer steps)
                    skipped += 1
                    self.optimizer.zero_grad(set_to_none=True)
                else:
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer_steps += 1
                metrics.add(step_metrics, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.update_count += 1
        elapsed = time.perf_counter() - start
        out = metrics.result()
        out.update(extra)
        out.pop("num_tokens", None)
        out["skipped_steps"] = float(skipped)
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        out["tokens_per_s"] = forward_tokens / max(elapsed, 1e-9)
        out["update_time_s"] = elapsed
        out["loss_tokens"] = float(mask.sum())
        out["optimizer_steps"] = float(self.optimizer_steps)
        out.update(self._ratio_percentiles())
        return out

    def _ratio_percentiles(self) -> dict[str, float]:
        """`ratio_p1`, `ratio_p99`: percentiles of the token importance ratio over every optimizer step of the
        update (and every rank): the tails that clipping acts on, which the mean and the extremes hide."""
        ratios = torch.cat([r for part in self.parallel.gather(self._token_ratios) for r in part] or [torch.zeros(0)])
        self._token_ratios = []
        if not ratios.numel():
            return {}
        p1, p99 = np.percentile(ratios.double().numpy(), [1, 99])
        return {"ratio_p1": float(p1), "ratio_p99": float(p99)}


def _split(order: list[int], parts: int) -> list[list[int]]:
    """Split into `parts` contiguous chunks of near-equal size (the first ones one longer)."""
    size, rest = divmod(len(order), parts)
    chunks, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < rest else 0)
        chunks.append(order[start:end])
        start = end
    return chunks


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    elif hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    else:
        raise ValueError(
            f"gradient_checkpointing=True but {type(model).__name__} has neither gradient_checkpointing_enable() "
            "nor a gradient_checkpointing attribute"
        )
