import pytest
import torch
from m2rl.model import token_logprobs


def naive(model, ids, mask=None):
    logits = model(ids, attention_mask=mask).float()
    lp = torch.log_softmax(logits, -1)
    out = torch.zeros(ids.shape, dtype=torch.float32)
    out[:, 1:] = lp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    p = lp.exp()
    ent = torch.zeros(ids.shape, dtype=torch.float32)
    ent[:, 1:] = -(p * lp).sum(-1)[:, :-1]
    if mask is not None:
        out, ent = out * mask, ent * mask
    return out, ent


@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_matches_naive_gather_with_gradients(tiny_model, chunk_size):
    tiny_model.lm_head_fp32 = True
    ids = torch.randint(0, 4096, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    adv = torch.randn(2, 19, generator=torch.Generator().manual_seed(1))

    ref_lp, ref_ent = naive(tiny_model, ids, mask)
    (ref_lp * adv).sum().add(ref_ent.sum() * 0.1).backward()
    ref_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()

    lp, ent = token_logprobs(tiny_model, ids, attention_mask=mask, return_entropy=True, chunk_size=chunk_size)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert (lp[:, 0] == 0).all() and (lp[1, :4] == 0).all()
    (lp * adv).sum().add(ent.sum() * 0.1).backward()
    for n, p in tiny_model.named_parameters():
        scale = ref_grads[n].abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_model_with_fp32_head(tiny_model):
    model = tiny_model.to(torch.bfloat16)
    ids = torch.randint(0, 4096, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lp = token_logprobs(model, ids, lm_head_fp32=True)
        hidden = model.hidden_states(ids)
        logits = torch.nn.functional.linear(hidden.float(), model.lm_head.weight.float())
        ref = torch.log_softmax(logits, -1)[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp[0, 1:], ref, rtol=1e-5, atol=1e-5)


def test_does_not_materialise_full_logits(tiny_model, monkeypatch):
    """Every lm_head matmul sees at most chunk_size rows (on CPU: ops.linear_logprobs_torch's chunks)."""
    import torch.nn.functional as F
    from m2rl.model import ops

    seen = []
    real_linear = F.linear

    def spy(x, w, *a):
        if w.shape[0] == tiny_model.config.vocab_size:
            seen.append(x.shape[0])
        return real_linear(x, w, *a)

    monkeypatch.setattr(ops.F, "linear", spy)
    ids = torch.randint(0, 4096, (3, 40))
    token_logprobs(tiny_model, ids, chunk_size=16).sum().backward()
    assert seen and max(seen) <= 16


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_target_mask_computes_only_wanted_positions(tiny_model, chunk_size):
    torch.manual_seed(3)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 17))
    target = (torch.rand(3, 17) < 0.4).long()
    target[2] = 0  # a row with nothing wanted
    full_lp, full_ent = token_logprobs(tiny_model, ids, return_entropy=True)
    lp, ent = token_logprobs(tiny_model, ids, return_entropy=True, chunk_size=chunk_size, target_mask=target)
    keep = target.bool() & (torch.arange(17) > 0)
    torch.testing.assert_close(lp, full_lp * keep, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, full_ent * keep, rtol=1e-6, atol=1e-6)
    # gradients of a loss on the wanted positions are the same either way
    weights = torch.randn(3, 17) * keep
    g_full = torch.autograd.grad((token_logprobs(tiny_model, ids) * weights).sum(), list(tiny_model.parameters()))
    g_mask = torch.autograd.grad((token_logprobs(tiny_model, ids, target_mask=target) * weights).sum(),
                                 list(tiny_model.parameters()))
    for a, b in zip(g_full, g_mask):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("implementation", ["torch", "chunked"])
def test_autocast_keeps_the_fp32_head_fp32(tiny_model, implementation):
    """Under bf16 autocast (`learner.bf16`) the head still computes fp32 logits when asked (M1's fp32 LM head):
    autocast must not turn the head's fp32 GEMM into a bf16 one, and the result stays fp32 (it was bf16 from
    the torch reference, which then failed to scatter into the fp32 positions with a target mask)."""
    from m2rl.model import ops
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    hidden = tiny_model.hidden_states(ids, attention_mask=mask).detach()
    h, w, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), tiny_model.lm_head.weight, ids[:, 1:].reshape(-1)
    with ops.using(linear_logprobs=implementation):
        plain, _ = ops.linear_logprobs(h, w, targets, fp32_logits=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast, _ = ops.linear_logprobs(h, w, targets, fp32_logits=True)
            positions = token_logprobs(tiny_model, ids, attention_mask=mask, target_mask=mask)
    assert autocast.dtype == torch.float32 and positions.dtype == torch.float32
    torch.testing.assert_close(autocast, plain)
