"""Fixtures for the server tests: the shipped tiny checkpoint (loaded once; tests that change weights load
their own copy), its tokenizer, and chat prompts of different lengths. Every test builds its own Scheduler."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from m2rl.agent.format import render
from m2rl.model import M2Tokenizer, load_pretrained
from m2rl.model.m2 import M2ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from serving_helpers import TINY_DIR


@pytest.fixture(scope="session")
def sft_model() -> M2ForCausalLM:
    return load_pretrained(TINY_DIR)


@pytest.fixture(scope="session")
def tokenizer() -> M2Tokenizer:
    return M2Tokenizer.from_file(TINY_DIR)


@pytest.fixture(scope="session")
def prompts(tokenizer: M2Tokenizer) -> list[list[int]]:
    """Chat prompts of different lengths, as clients send them."""
    questions = ["What is 2 + 2?", "Compute 17 * 23 with the python tool.", "hi",
                 "Please compute the sum of the first 100 prime numbers and then submit it.",
                 "What is 6 * 7?", "Factor 391.", "How many days are in 3 weeks?", "Sort 3, 1, 2."]
    return [tokenizer.encode(render([{"role": "user", "content": q}], add_generation_prompt=True)) for q in questions]


