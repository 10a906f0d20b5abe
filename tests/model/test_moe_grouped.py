"""moe_experts_grouped against the reference moe_experts_torch (forward and every gradient), its shape-only
control flow, and ops.select_defaults. The GPU tests run the released M2 layer's shapes in bf16."""

from __future__ import annotations

import pytest
import torch
from m2rl.model import ops
from m2rl.model.moe_grouped import _fits, moe_experts_grouped
from torch.utils._python_dispatch import TorchDispatchMode


def make_inputs(T, D, I, E, K, dtype=torch.float32, device="cpu", seed=0, experts_TK=None):
    """Random normal activations, weights scaled to keep activations O(1), distinct experts per token,
    positive fp32 routing weights."""
    g = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x = randn(T, D)
    w1, w3, w2 = randn(E, I, D, scale=D**-0.5), randn(E, I, D, scale=D**-0.5), randn(E, D, I, scale=I**-0.5)
    if experts_TK is None:
        experts_TK = torch.rand(T, E, generator=g, device=device).topk(K, dim=1).indices
    weights = torch.rand(T, K, generator=g, device=device) + 0.1
    return x, w1, w3, w2, experts_TK, weights / weights.sum(1, keepdim=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = [(40, 24, 5, 2), (32, 16, 8, 2), (128, 128, 8, 2)]  # odd widths and experts; the tiny preset


@pytest.mark.parametrize("D, I, E, K", SHAPES)
@pytest.mark.parametrize("T", [1, 5, 64])
def test_forward_matches_reference(T, D, I, E, K):
    x, w1, w3, w2, experts, weights = make_inputs(T, D, I, E, K, seed=T)
    assert _fits(x, w1, w3, w2)  # the grouped path runs, not the fallback
    got = moe_experts_grouped(x, w1, w3, w2, experts, weights)
    torch.testing.assert_close(got, ops.moe_experts_torch(x, w1, w3, w2, experts, weights), rtol=1e-5, atol=1e-5)

    args = [t.bfloat16() for t in (x, w1, w3, w2)]
    got = moe_experts_grouped(*args, experts, weights)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ops.moe_experts_torch(*args, experts, weights)) < 1e-2


def test_empty_experts_first_middle_and_last():
    T, D, I, E, K = 9, 40, 24, 5, 2
    experts = torch.tensor([[1, 3], [3, 1]] * 4 + [[1, 3]])  # experts 0, 2 and 4 get no token
    x, w1, w3, w2, experts, weights = make_inputs(T, D, I, E, K, experts_TK=experts)
    torch.testing.assert_close(moe_experts_grouped(x, w1, w3, w2, experts, weights),
                               ops.moe_experts_torch(x, w1, w3, w2, experts, weights), rtol=1e-5, atol=1e-5)


def test_unaligned_width_falls_back_to_reference():
    # D = 36 bf16 rows are 72 bytes: torch._grouped_mm refuses strides that are not multiples of 16 bytes.
    x, w1, w3, w2, experts, weights = make_inputs(6, 36, 24, 5, 2, dtype=torch.bfloat16)
    assert not _fits(x, w1, w3, w2)
    assert torch.equal(moe_experts_grouped(x, w1, w3, w2, experts, weights),
                       ops.moe_experts_torch(x, w1, w3, w2, experts, weights))


def _grads(fn, x, w1, w3, w2, experts, weights, grad_out):
    leaves = [t.clone().requires_grad_() for t in (x, w1, w3, w2, weights)]
    out = fn(*leaves[:4], experts, leaves[4])
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("D, I, E, K", SHAPES[:2])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_gradients_match_reference(T, D, I, E, K):
    inputs = make_inputs(T, D, I, E, K, seed=T + 1)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(7))
    out, grads = _grads(moe_experts_grouped, *inputs, grad_out)
    ref_out, ref_grads = _grads(ops.moe_experts_torch, *inputs, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, got, ref in zip(("x", "w1", "w3", "w2", "weights"), grads, ref_grads):
        assert got is not None, name
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


class _OpTrace(TorchDispatchMode):
    """Every aten op run, with its output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]))
        return out


def _trace(fn, experts):
    x, w1, w3, w2, experts, weights = make_inputs(64, 40, 24, 8, 2, experts_TK=experts)
    leaves = [t.requires_grad_() for t in (x, w1, w3, w2, weights)]
    with _OpTrace() as trace:
        fn(*leaves[:4], experts, leaves[4]).sum().backward()
    return trace.ops


def test_ops_and_shapes_depend_only_on_input_shapes():
    # A host sync reads a value (_local_scalar_dense: .item()/.tolist()); a data-dependent shape shows up
    # as a different trace for a different routing. The reference has both, so the oracle can fail.
    balanced = torch.rand(64, 8, generator=torch.Generator().manual_seed(0)).topk(2, dim=1).indices
    one_sided = torch.tensor([[0, 1]]).expand(64, 2).contiguous()
    trace = _trace(moe_experts_grouped, balanced)
    assert trace == _trace(moe_experts_grouped, one_sided)
    names = {name for name, _ in trace}
    assert "aten._grouped_mm.default" in names
    assert not {n for n in names if "_local_scalar_dense" in n or "nonzero" in n or "bincount" in n}
    assert _trace(ops.moe_experts_torch, balanced) != _trace(ops.moe_experts_torch, one_sided)


def test_tiny_model_runs_on_grouped_mm(tiny_model):
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(ids)
        with ops.using(moe_experts="grouped_mm"):
            got = tiny_model(ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


# ---- select_defaults ------------------------------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    """A private registry holding this file's implementations (torch, grouped_mm), torch selected, no
    M2RL_OPS, and m2rl.kernels imports recorded instead of made."""
    impls = {op: {n: f for n, f in fns.items() if n in ("torch", "grouped_mm")} for op, fns in ops._IMPLS.items()}
    monkeypatch.setattr(ops, "_IMPLS", impls)
    monkeypatch.setattr(ops, "_SELECTED", dict.fromkeys(impls, "torch"))
    monkeypatch.setattr(ops, "_FORCED", set())
    monkeypatch.setattr(ops, "_DEFAULTS", {})
    monkeypatch.setattr(ops, "_TRAINING_DEFAULTS", {})
    monkeypatch.delenv(ops.OPS_ENV, raising=False)
    imports = []
    monkeypatch.setattr(ops, "_import_kernels", lambda: imports.append("m2rl.kernels"))
    return imports


def test_cpu_keeps_torch_and_never_imports_kernels(registry):
    ops.select_defaults("cuda")
    ops.select_defaults(torch.device("cpu"))
    assert ops.selected("moe_experts", "cpu") == "torch" and ops.selected("rms_norm", "cpu") == "torch"
    assert ops.selected("moe_experts", "cuda") == "grouped_mm"  # each device type keeps its own defaults
    assert registry == ["m2rl.kernels"]  # the CUDA call only


def test_dispatch_follows_the_device_of_the_input(registry):
    """After a CUDA model selected its kernels, a CPU model in the same process still runs torch."""
    calls = []
    ops.register("moe_experts", "cuda_only", lambda *a: calls.append("cuda_only"))
    ops.register("moe_experts", "torch", lambda *a: calls.append("torch"))
    ops.PREFERRED["cuda"]["moe_experts"] = ("cuda_only",)
    try:
        ops.select_defaults("cuda")
        ops.moe_experts(torch.zeros(1, 8), *[torch.zeros(1)] * 3, torch.zeros(1, 1, dtype=torch.long),
                        torch.zeros(1, 1))
    finally:
        ops.PREFERRED["cuda"]["moe_experts"] = ("triton", "grouped_mm", "torch")
    assert calls == ["torch"]


def test_cuda_takes_the_first_registered_preference(registry):
    ops.select_defaults(torch.device("cuda", 0))
    assert ops.selected("moe_experts", "cuda") == "grouped_mm"
    assert ops.selected("rms_norm", "cuda") == "torch"
    ops.register("moe_experts", "triton", ops.moe_experts_torch)  # what m2rl.kernels would do
    assert ops.selected("moe_experts", "cuda") == "grouped_mm"  # registering selects nothing
    ops.select_defaults("cuda")
    assert ops.selected("moe_experts", "cuda") == "triton"


def test_autograd_takes_the_training_preference(registry, monkeypatch):
    """Inputs that need gradients run PREFERRED_TRAINING's choice (on CUDA the MoE's cuBLAS grouped GEMMs,
    whose backward beats the fused kernel's); no_grad, a forced choice or M2RL_OPS keep one implementation."""
    calls = []
    ops.register("moe_experts", "fused", lambda *a: calls.append("fused"))
    ops.register("moe_experts", "grouped_mm", lambda *a: calls.append("grouped_mm"))
    monkeypatch.setitem(ops.PREFERRED, "cpu", {"moe_experts": ("fused", "torch")})
    monkeypatch.setitem(ops.PREFERRED_TRAINING, "cpu", {"moe_experts": ("grouped_mm", "fused")})
    ops.select_defaults("cpu")
    x, w = torch.zeros(1, 8), torch.zeros(1, requires_grad=True)
    args = (x, w, w, w, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1))
    ops.moe_experts(*args)
    with torch.no_grad():
        ops.moe_experts(*args)
    assert calls == ["grouped_mm", "fused"]
    assert (ops.selected("moe_experts", "cpu"), ops.selected_training("moe_experts", "cpu")) == ("fused", "grouped_mm")
    with ops.using(moe_experts="fused"):
        ops.moe_experts(*args)
    monkeypatch.setenv(ops.OPS_ENV, "moe_experts=fused")
    ops.select_defaults("cpu")
    ops.moe_experts(*args)
    assert calls[2:] == ["fused", "fused"]


def test_forced_choices_survive_select_defaults(registry):
    ops.use("moe_experts", "torch")
    ops.select_defaults("cuda")
    assert ops.selected("moe_experts", "cuda") == "torch"
    ops._FORCED.clear()
    with ops.using(moe_experts="torch"):
        ops.select_defaults("cuda")
        assert ops.selected("moe_experts", "cuda") == "torch"
    assert "moe_experts" not in ops._FORCED  # using() forces for its block only
    ops.select_defaults("cuda")
    assert ops.selected("moe_experts", "cuda") == "grouped_mm"


def test_env_overrides_device_defaults_not_forced_choices(registry, monkeypatch):
    monkeypatch.setenv(ops.OPS_ENV, " moe_experts = torch , rms_norm=torch,")
    ops.select_defaults("cuda")
    assert ops.selected("moe_experts", "cuda") == "torch"
    monkeypatch.setenv(ops.OPS_ENV, "moe_experts=grouped_mm")
    ops.select_defaults("cpu")
    assert ops.selected("moe_experts", "cpu") == "grouped_mm"
    ops.use("moe_experts", "torch")
    ops.select_defaults("cpu")
    assert ops.selected("moe_experts", "cpu") == "torch"


@pytest.mark.parametrize("spec, error, match", [
    ("moe_experts=cutlass", KeyError,
     r"M2RL_OPS=.*op 'moe_experts' has no implementation 'cutlass'; registered: \['grouped_mm', 'torch'\]"),
    ("flash_everything=torch", KeyError, r"unknown op 'flash_everything'; ops: \[.*'moe_experts'.*\]"),
    ("moe_experts", ValueError, r"expected op=implementation, got 'moe_experts'"),
])
def test_env_errors_name_the_op_and_what_is_registered(registry, monkeypatch, spec, error, match):
    monkeypatch.setenv(ops.OPS_ENV, spec)
    before = dict(ops._SELECTED), {k: dict(v) for k, v in ops._DEFAULTS.items()}
    with pytest.raises(error, match=match):
        ops.select_defaults("cpu")
    assert (ops._SELECTED, ops._DEFAULTS) == before


def test_load_pretrained_selects_for_its_device(registry, monkeypatch, tiny_model, tmp_path):
    from m2rl.model import load_pretrained, save_pretrained

    save_pretrained(tiny_model, tmp_path)
    calls = []
    monkeypatch.setattr(ops, "select_defaults", calls.append)
    load_pretrained(tmp_path)
    assert calls == ["cpu"]


# ---- GPU: the released M2 layer (D 3072, I 1536, E 256, K 8) in bf16 -------------------------------------
M2_LAYER = {"D": 3072, "I": 1536, "E": 256, "K": 8}


@pytest.fixture(scope="module")
def m2_weights():
    D, I, E = M2_LAYER["D"], M2_LAYER["I"], M2_LAYER["E"]
    _, w1, w3, w2, _, _ = make_inputs(1, D, I, E, 8, dtype=torch.bfloat16, device="cuda")
    return w1, w3, w2


def _m2_routing(T, seed):
    D, E, K = M2_LAYER["D"], M2_LAYER["E"], M2_LAYER["K"]
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(T, D, generator=g, device="cuda").bfloat16()
    experts = torch.rand(T, E, generator=g, device="cuda").topk(K, dim=1).indices
    weights = torch.rand(T, K, generator=g, device="cuda") + 0.1
    return x, experts, weights / weights.sum(1, keepdim=True)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
def test_gpu_m2_layer_bf16_matches_reference(m2_weights, T):
    w1, w3, w2 = m2_weights
    x, experts, weights = _m2_routing(T, seed=T)
    assert _fits(x, w1, w3, w2)  # the CUTLASS grouped GEMM, not a fallback
    grad_out = torch.randn(T, x.shape[1], device="cuda").bfloat16()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        out, grads = _grads(moe_experts_grouped, x, w1, w3, w2, experts, weights, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _, again = _grads(moe_experts_grouped, x, w1, w3, w2, experts, weights, grad_out)
    assert torch.equal(grads[0], again[0])  # dx sums its K slots in a fixed order
    # The oracle: the reference in fp32 on the same bf16 values (its own bf16 rounding would add noise).
    ref_out, ref_grads = _grads(ops.moe_experts_torch, *(t.float() for t in (x, w1, w3, w2)), experts, weights,
                                grad_out.float())
    assert rel_err(out, ref_out) < 2e-2
    for name, got, ref in zip(("x", "w1", "w3", "w2", "weights"), grads, ref_grads):
        assert rel_err(got, ref) < 2e-2, name


@pytest.mark.gpu
def test_gpu_forward_replays_in_a_cuda_graph(m2_weights):
    w1, w3, w2 = m2_weights
    x, experts, weights = _m2_routing(64, seed=1)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, kernel selection) off the capture stream
            moe_experts_grouped(x, w1, w3, w2, experts, weights)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe_experts_grouped(x, w1, w3, w2, experts, weights)
        for seed in (2, 3):  # new routings in the same buffers
            new_x, new_experts, new_weights = _m2_routing(64, seed)
            x.copy_(new_x), experts.copy_(new_experts), weights.copy_(new_weights)
            graph.replay()
            torch.testing.assert_close(out, moe_experts_grouped(x, w1, w3, w2, experts, weights), rtol=0, atol=0)
