"""Causal-LM distillation: chat/prompt-masked data, evaluation against the teacher, and the
``kind: causal-lm`` recipe pipeline."""

from .data import LMExample, encode_example, fortune_examples, prompt_ids, tokenize_examples
from .evaluate import causal_lm_forward, forward_tokens_per_s, generate, lm_figures

__all__ = [
    "LMExample",
    "causal_lm_forward",
    "encode_example",
    "forward_tokens_per_s",
    "fortune_examples",
    "generate",
    "lm_figures",
    "prompt_ids",
    "tokenize_examples",
]
