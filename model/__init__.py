"""m2rl.model: the MiniMax-M2 policy network, its checkpoints, tokenizer, generation and log-probs."""

from m2rl.model import ops
from m2rl.model.checkpoint import CheckpointError, checkpoint_tensors, load_pretrained, save_pretrained
from m2rl.model.config import M2Config, M2ConfigError
from m2rl.model.generate import GenerationOutput, SamplingParams, generate
from m2rl.model.kv_cache import KVCache
from m2rl.model.logprobs import token_logprobs
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.tokenizer import M2Tokenizer

__all__ = [
    "CheckpointError", "GenerationOutput", "KVCache", "M2Config", "M2ConfigError", "M2ForCausalLM",
    "M2Tokenizer", "SamplingParams", "checkpoint_tensors", "generate", "load_pretrained", "ops", "save_pretrained", "token_logprobs",
]
