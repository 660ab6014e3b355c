"""Causal-LM distillation: chat/prompt-masked data, evaluation against the teacher, and the
teacher answers, on-policy sampling."""

from .data import LMExample, encode_example, fortune_examples, prompt_ids, tokenize_examples
from .evaluate import forward_tokens_per_s, greedy_generations, lm_figures
from .forward import causal_lm_forward

__all__ = [
    "LMExample",
    "causal_lm_forward",
    "encode_example",
    "forward_tokens_per_s",
    "fortune_examples",
    "greedy_generations",
    "lm_figures",
    "prompt_ids",
    "tokenize_examples",
]
