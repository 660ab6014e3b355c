"""sentence-transformers folders: the pooling one declares, and a student's export made a
sentence-transformers model by the library itself (its Pooling and Normalize modules and their
config files written by ``SentenceTransformer.save``), with the settings of the model the
student came from (maximum sequence length, similarity function, prompts)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODE_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
    "mean": "pooling_mode_mean_tokens",
}
"""potstill's pooling mode → the flag a sentence-transformers Pooling config sets for it."""
ST_MODES = {"mean_sqrt_len": "mean_sqrt_len_tokens"}
"""potstill's pooling modes that sentence-transformers names otherwise."""
WEIGHTS = (".safetensors", ".bin", ".pt", ".safetensors.index.json", ".bin.index.json")
"""The weight files of a folder, which the sentence-transformers save does not replace."""
ST_POOLING_NAMES = {"mean_sqrt_len_tokens": "mean_sqrt_len", "mean_tokens": "mean",
                    "cls_token": "cls", "max_tokens": "max"}  # fmt: skip
"""sentence-transformers' ``pooling_mode`` names → potstill's."""


def declared_pooling(folder: str | os.PathLike) -> tuple[str, bool] | None:
    """``(mode, normalize)`` that a sentence-transformers folder declares (``modules.json``: its
    Pooling module's config, and whether a Normalize module follows); None for a folder that
    is not one (no ``modules.json``)."""
    folder = Path(folder)
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return None
    mode, normalize = "mean", False
    for module in json.loads(modules_file.read_text()):
        kind = str(module.get("type", ""))
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            cfg_file = folder / module.get("path", "") / "config.json"
            cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
            chosen = [m for m, key in MODE_KEYS.items() if cfg.get(key)]
            if len(chosen) > 1:
                raise ValueError(
                    f"{cfg_file}: pools by {', '.join(chosen)} at once (concatenated); potstill "
                    "pools by one mode: set one in the recipe's pooling"
                )
            named = str(cfg.get("pooling_mode", "mean"))  # the library's newer config
            mode = chosen[0] if chosen else ST_POOLING_NAMES.get(named, named)
    return mode, normalize


def _modules() -> tuple[Any, Any, Any]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError(
            "exporting a sentence-transformers model needs the sentence-transformers package: "
            "pip install sentence-transformers (or potstill[hf])"
        ) from e
    try:  # sentence-transformers ≥ 6; the older name warns there
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling
    return SentenceTransformer, Pooling, Normalize


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_sentence_transformer(
    out: str | os.PathLike, source: str | os.PathLike, pooling: tuple[str, bool] | None = None
) -> None:
    """Make the Hugging Face encoder folder ``out`` (weights and tokenizer written) a
    sentence-transformers model through the library: ``SentenceTransformer`` over it with a
    Pooling module (``pooling``: ``(mode, normalize)``; default: what ``source`` declares) and a
    Normalize module when asked, saved by ``SentenceTransformer.save``; the settings of the
    sentence-transformers folder ``source`` (the model the student came from) are kept. Only
    the library's own files are added to ``out``: its weights stay those written."""
    out, source = Path(out), Path(source)
    if not (source / "modules.json").exists():
        raise FileNotFoundError(f"{source} has no modules.json: not a sentence-transformers folder")
    mode, normalize = pooling or declared_pooling(source) or ("mean", False)
    SentenceTransformer, Pooling, Normalize = _modules()
    quiet = logging.getLogger("sentence_transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "no sentence-transformers model found, creating one": yes
    try:
        base = SentenceTransformer(str(out), device="cpu")
    finally:
        quiet.setLevel(level)
    word = base[0]
    settings = _json(source / "sentence_bert_config.json")
    # the source's length: its own setting (older configs), else its tokenizer's (newer ones);
    # never past what the student's positions take (set from its config when loaded)
    length = settings.get("max_seq_length") or _json(source / "tokenizer_config.json").get(
        "model_max_length"
    )
    if length and word.max_seq_length:
        word.max_seq_length = min(int(length), int(word.max_seq_length))
    if "do_lower_case" in settings and hasattr(word, "do_lower_case"):
        word.do_lower_case = bool(settings["do_lower_case"])
    extra = _json(source / "config_sentence_transformers.json")
    size = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
    modules = [word, Pooling(size(), ST_MODES.get(mode, mode))]
    modules += [Normalize()] if normalize else []
    model = SentenceTransformer(
        modules=modules, device="cpu", prompts=extra.get("prompts") or None,
        similarity_fn_name=extra.get("similarity_fn_name"),
    )  # fmt: skip
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-st-") as tmp:
        model.save(tmp, create_model_card=False)
        # everything the library wrote (its module files and folders, the tokenizer with the
        # maximum length set) but the model: its weights and config stay the ones written
        for path in sorted(Path(tmp).rglob("*")):
            rel = path.relative_to(tmp)
            if path.is_file() and not path.name.endswith(WEIGHTS) and str(rel) != "config.json":
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, out / rel)


__all__ = ["declared_pooling", "save_sentence_transformer"]
