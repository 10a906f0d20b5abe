"""Kernel tests run on the GPU where there is one, else on CPU tensors under Triton's interpreter.

Without a GPU, TRITON_INTERPRET=1 must hold while Triton itself is first imported (its own library
functions are decorated then), while the kernel modules are imported (`@triton.jit` picks interpreter or
compiler), and while kernels run (Triton imports parts of itself lazily and checks again). So this file,
which pytest imports before the test modules of this folder and before those of folders after it (a
`tests/model` module imports Triton at collection), imports Triton and `m2rl.kernels` with the variable
set, and an autouse fixture sets it for each test here; it is unset everywhere else, so other tests and
the subprocesses they start never see it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _import_kernels_interpreted() -> str | None:
    """Import m2rl.kernels under the interpreter; returns why that is impossible in this process, if it is."""
    blocked = ("Triton was imported without TRITON_INTERPRET=1 before these tests were collected, so its "
               "interpreter cannot run in this process; run tests/kernels on its own or first")
    imported = sys.modules.get("m2rl.kernels.fused_moe")
    if imported is not None:
        return None if imported._INTERPRETED else blocked
    if "triton" in sys.modules:
        return blocked
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("m2rl.kernels")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return None


INTERPRETER_BLOCKED = _import_kernels_interpreted() if HAS_TRITON and not HAS_CUDA else None


@pytest.fixture(autouse=True)
def _interpret_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def fused_moe() -> ModuleType:
    pytest.importorskip("triton")
    if INTERPRETER_BLOCKED:
        pytest.skip(INTERPRETER_BLOCKED)
    return importlib.import_module("m2rl.kernels.fused_moe")


@pytest.fixture(scope="session")
def moe_align() -> ModuleType:
    """Plain torch ops: needs neither Triton nor its interpreter (importing m2rl.kernels may load both)."""
    return importlib.import_module("m2rl.kernels.moe_align")


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
