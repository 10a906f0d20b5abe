"""Kernel tests run on the GPU where there is one, else on CPU tensors under Triton's interpreter.

Without a GPU, TRITON_INTERPRET=1 must hold while Triton itself is first imported (its own library
functions are decorated then), while the kernel modules are imported (`@triton.jit` picks interpreter or
compiler), and while kernels run (Triton imports parts of itself lazily and checks again). So it is set
around the fixtures' first import and for the duration of each test here, and never outside them: other
tests in the process, and the subprocesses they start, do not see it. Test modules here import
`m2rl.kernels` only through these fixtures.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _interpret_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _import_kernels() -> None:
    """Import m2rl.kernels, which imports every kernel module where Triton is installed."""
    if HAS_CUDA:
        importlib.import_module("m2rl.kernels")
        return
    if "triton" in sys.modules and "m2rl.kernels" not in sys.modules:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 before these tests, so its interpreter "
                    "cannot run them in this process; run tests/kernels on their own")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("m2rl.kernels")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


@pytest.fixture(scope="session")
def fused_moe() -> ModuleType:
    pytest.importorskip("triton")
    _import_kernels()
    return importlib.import_module("m2rl.kernels.fused_moe")


@pytest.fixture(scope="session")
def moe_align() -> ModuleType:
    _import_kernels()  # the package imports fused_moe too, where Triton is installed
    return importlib.import_module("m2rl.kernels.moe_align")


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
