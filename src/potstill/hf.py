"""Hugging Face models: load teachers and students by hub name or local path with the ordinary
``from_pretrained`` calls, check that two tokenizers agree, and export a plain student folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .placement import cpu_state
from .sbert import save_sentence_transformer
from .sealed import seal, verify

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("potstill")

ModelKind = Literal["encoder", "sequence-classification", "causal-lm"]
"""Which Auto class loads a model: a bare encoder, a sequence classifier, a causal LM."""
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation turns a large teacher into a small, fast student!",
    "naïve café déjà-vu 12,345.67 #hashtag @user https://example.com/x?y=1",
    "   leading spaces, tabs\tand\nnewlines   ",
)


class TokenizerMismatch(ValueError):
    """Teacher and student do not tokenize the same way."""


def _auto_class(task: ModelKind):
    import transformers

    classes = {
        "encoder": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }
    if task not in classes:
        raise ValueError(f"task must be one of {sorted(classes)}, got {task!r}")
    return classes[task]


def no_hub_kernels() -> dict[str, Any]:
    """``from_pretrained`` options that keep the hub's kernels out: ``use_kernels=False`` where
    transformers has them (5.x turns them on by default: kernel code fetched from the hub and
    run on the first ``train()`` / ``eval()``; potstill runs no remote code unless asked, and
    they fail on devices the kernels library does not know); nothing on older releases."""
    from transformers import PreTrainedModel

    return {"use_kernels": False} if hasattr(PreTrainedModel, "use_kernels") else {}


def load_model(
    name_or_path: str | os.PathLike,
    task: ModelKind = "encoder",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """A model by hub name or local folder, through ``AutoModel*.from_pretrained``.

    ``dtype`` (``"float32"``, ``"bfloat16"``, a torch dtype, or ``"auto"``) and ``device`` are
    passed on; remote code runs only with ``trust_remote_code=True`` (and the hub's kernels
    only with ``use_kernels=True``: :func:`no_hub_kernels`). Attention maps for
    attention terms need ``attn_implementation="eager"``.
    """
    cls = _auto_class(task)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16', "
                "'float16' or 'auto'"
            )
        dtype = getattr(torch, dtype)
    if Path(name_or_path).is_dir():  # a folder potstill wrote is verified before it is used
        verify(name_or_path)
    try:
        model = cls.from_pretrained(
            str(name_or_path),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            **{**no_hub_kernels(), **kwargs},
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load {name_or_path!r} as a Hugging Face {task} model: {e}. Give a local "
            "folder with config.json and weights, or a hub name on a machine with access."
        ) from e
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_tokenizer(
    name_or_path: str | os.PathLike, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub name or local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)


def check_same_tokenization(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    texts: Sequence[str] = SAMPLE_TEXTS,
) -> None:
    """Raise :class:`TokenizerMismatch` unless both tokenizers give the same ids for ``texts``
    and have the same vocabulary — what token-level terms (logit divergences) need."""
    for text in texts:
        a, b = teacher(text)["input_ids"], student(text)["input_ids"]
        if a != b:
            raise TokenizerMismatch(
                f"teacher and student tokenize differently, so token-level terms cannot compare "
                f"them position by position: {text!r} gives teacher ids {a[:12]}… and student ids "
                f"{b[:12]}…. Use a student that shares the teacher's tokenizer (e.g. derive it "
                "from the teacher), or terms on pooled outputs / response distillation."
            )
    va, vb = teacher.get_vocab(), student.get_vocab()
    if va != vb:
        only_t = sorted(set(va) - set(vb))[:5]
        only_s = sorted(set(vb) - set(va))[:5]
        changed = sorted(k for k in set(va) & set(vb) if va[k] != vb[k])[:5]
        raise TokenizerMismatch(
            f"teacher and student vocabularies differ ({len(va)} vs {len(vb)} entries; only in "
            f"teacher: {only_t}, only in student: {only_s}, different ids: {changed})"
        )


def check_aligned_positions(
    teacher: PreTrainedTokenizerBase,
    student: PreTrainedTokenizerBase,
    texts: Sequence[str] = SAMPLE_TEXTS,
) -> None:
    """Raise :class:`TokenizerMismatch` unless both tokenizers split ``texts`` into the same
    tokens (ids may differ): what hidden-state and attention terms need to pair positions."""
    for text in texts:
        a = teacher.convert_ids_to_tokens(teacher(text)["input_ids"])
        b = student.convert_ids_to_tokens(student(text)["input_ids"])
        strip = {teacher.cls_token, teacher.sep_token, student.cls_token, student.sep_token}
        core_a = [t for t in a if t not in strip]
        core_b = [t for t in b if t not in strip]
        if len(a) != len(b) or core_a != core_b:
            raise TokenizerMismatch(
                f"teacher and student split {text!r} differently ({len(a)} vs {len(b)} tokens: "
                f"{a[:10]}… vs {b[:10]}…), so hidden states and attention maps cannot be paired "
                "position by position; use terms on pooled outputs instead"
            )


def shared_vocab_size(
    teacher: PreTrainedModel, student: PreTrainedModel, tokenizer_len: int
) -> int:
    """The number of output rows to compare when teacher and student logits differ in size only
    by padding rows (embedding matrices rounded up to a multiple of 64 and the like).

    Raises :class:`TokenizerMismatch` when a model has fewer rows than the tokenizer has tokens.
    """
    v_t = teacher.get_output_embeddings().weight.shape[0]
    v_s = student.get_output_embeddings().weight.shape[0]
    shared = min(v_t, v_s)
    if shared < tokenizer_len:
        raise TokenizerMismatch(
            f"output sizes {v_t} (teacher) and {v_s} (student) do not cover the tokenizer's "
            f"{tokenizer_len} tokens: these models do not share a vocabulary"
        )
    if v_t != v_s:
        log.info(
            "teacher has %d output rows and student %d: comparing the %d shared rows (the rest "
            "are padding beyond the tokenizer's %d tokens)", v_t, v_s, shared, tokenizer_len,
        )  # fmt: skip
    return shared


def export_pretrained(
    model: PreTrainedModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    card: str | None = None,
    sentence_transformers_from: str | os.PathLike | None = None,
    pooling: tuple[str, bool] | None = None,
    sealed: bool = True,
) -> Path:
    """Save a plain Hugging Face folder: ``save_pretrained`` (safetensors), the tokenizer, a model
    card (README.md), and — given the sentence-transformers folder the model came from — the
    sentence-transformers modules saved by the library itself
    (:func:`potstill.sbert.save_sentence_transformer`: ``pooling`` as ``(mode, normalize)``,
    default the source's), so ``SentenceTransformer(out)`` loads it. Nothing of potstill's
    (projectors, hooks, wrappers) goes in. With ``sealed`` (the default) the folder gets its
    ``SHA256SUMS`` (:func:`potstill.sealed.seal`), which potstill's loaders verify."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=cpu_state(model))  # a GPU's weights via the CPU
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if sentence_transformers_from is not None:
        save_sentence_transformer(out, sentence_transformers_from, pooling)
    if card is not None:
        (out / "README.md").write_text(card)
    if sealed:
        seal(out)
    return out


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Turn a GGUF model that transformers can read into a plain safetensors folder (weights
    dequantized to float32, tokenizer, generation config), so later loads are fast.

    transformers will not ``save_pretrained`` a GGUF-loaded model, so the weights are moved into
    a fresh model of the same class built from the config without its quantization entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise ImportError(f"reading GGUF needs the 'gguf' package (pip install gguf): {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    out = Path(out_dir)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
