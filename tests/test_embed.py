"""potstill.tasks.embedding and the embed runner: fortunes texts, paired tokenization, mean pooling,
the precomputed teacher, the embedding metrics (against loop / scipy references), the embed recipe,
and a small end-to-end run with the packaged all-MiniLM-L6-v2 as teacher and derived student.

Tests that need the packaged MiniLM or Debian's fortunes texts skip when they are missing."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import MINILM, assert_report_rebuilds, assert_results_header, card_metric, read_card
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel

from potstill import hf
from potstill.config import TrainConfig
from potstill.data.fortunes import FORTUNES_DIR, load_fortunes
from potstill.data.tensors import TensorDictDataset, fingerprint, make_batch
from potstill.recipe import RecipeError, load_recipe
from potstill.recipe.embed import EmbedRecipe
from potstill.runs import run as run_recipe
from potstill.students import derive
from potstill.tasks.embedding import (
    embed,
    encoder_forward,
    linear_map_cosine,
    mean_pool,
    neighbour_agreement,
    similarity_correlation,
    tokenize_pair,
)
from potstill.teachers import LiveTeacher, PrecomputedTeacher

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
FORTUNES_AVAILABLE = FORTUNES_DIR.is_dir() and any(
    p.is_file() and "." not in p.name for p in FORTUNES_DIR.iterdir()
)
SENTENCES = [
    "A man is playing a guitar.",
    "Knowledge distillation makes small students out of large teachers, one batch at a time.",
    "Hi!",
    "Fortune favours the bold; misfortune favours the unprepared.",
]

needs_fortunes = pytest.mark.skipif(
    not FORTUNES_AVAILABLE,
    reason=f"no fortune files in {FORTUNES_DIR} (install Debian's fortunes package)",
)


# one intra-op thread: tiny models run as fast, and far faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def minilm():
    """(folder, model, tokenizer) of the packaged all-MiniLM-L6-v2."""
    if MINILM is None:
        pytest.skip("all-MiniLM-L6-v2 not packaged here: potstill.assets.minilm_l6() is None")
    return MINILM, hf.load_model(MINILM, "encoder"), hf.load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def fortunes() -> list[str]:
    if not FORTUNES_AVAILABLE:
        pytest.skip(f"no fortune files in {FORTUNES_DIR} (install Debian's fortunes package)")
    return load_fortunes()


# --- load_fortunes --------------------------------------------------------------------------------


def test_fortunes_texts_clean_unique_deterministic(fortunes):
    assert len(fortunes) > 1000
    assert all(isinstance(t, str) and t for t in fortunes)
    assert all(20 <= len(t) <= 400 for t in fortunes)
    assert len(set(fortunes)) == len(fortunes)
    assert not any("\n" in t or "\t" in t or "  " in t for t in fortunes)
    assert all(t == t.strip() for t in fortunes)
    assert load_fortunes() == fortunes
    assert load_fortunes(FORTUNES_DIR) == fortunes


@needs_fortunes
def test_fortunes_skip_dat_and_u8_files(tmp_path):
    """Only the plain text files are read: the same folder with only those gives the same texts,
    and a folder with only the .dat / .u8 files has none."""
    plain = tmp_path / "plain"
    binary = tmp_path / "binary"
    plain.mkdir()
    binary.mkdir()
    for p in FORTUNES_DIR.iterdir():
        if not p.is_file():
            continue
        target = binary if p.suffix in (".dat", ".u8") else plain
        (target / p.name).write_bytes(p.read_bytes())
    assert load_fortunes(plain) == load_fortunes()
    with pytest.raises(FileNotFoundError):
        load_fortunes(binary)


def test_fortunes_hand_written_folder(tmp_path):
    # written out of name order: the result follows file names, then positions
    (tmp_path / "beta").write_text(
        "Third fortune is in the beta file.\n%\n"
        "First fortune here, long enough.\n%\n"  # duplicate of alpha's first
        "Fourth: the\ttab and  spaces   fold.\n"
    )
    (tmp_path / "alpha").write_text(
        "First fortune here, long enough.\n%\n"
        "Short\n%\n"  # below min_chars
        "  Second   fortune\nspans two lines, ok.  \n%\n"
    )
    (tmp_path / "x.dat").write_text("This would be a fortune if the .dat file were read.\n%\n")
    (tmp_path / "x.u8").write_text("And this one if the .u8 file were read, which it is not.\n")
    expected = [
        "First fortune here, long enough.",
        "Second fortune spans two lines, ok.",
        "Third fortune is in the beta file.",
        "Fourth: the tab and spaces fold.",
    ]
    assert load_fortunes(tmp_path) == expected
    assert load_fortunes(str(tmp_path)) == expected
    assert load_fortunes(tmp_path, min_chars=5) == [*expected[:1], "Short", *expected[1:]]
    assert load_fortunes(tmp_path, max_chars=33) == [expected[0], expected[3]]


def test_fortunes_empty_entries_leave_no_percent_sign(tmp_path):
    (tmp_path / "a").write_text(
        "Entry one is long enough here.\n%\n%\nEntry two is long enough here.\n%\n"
    )
    (tmp_path / "b").write_text("%\nEntry three opens the file after a '%' line.\n%\n")
    assert load_fortunes(tmp_path) == [
        "Entry one is long enough here.",
        "Entry two is long enough here.",
        "Entry three opens the file after a '%' line.",
    ]


def test_fortunes_empty_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="fortunes") as info:
        load_fortunes(tmp_path)
    assert str(tmp_path) in str(info.value)


# --- TensorDictDataset / make_batch / fingerprint -------------------------------------------------


def _ids_dataset(n: int = 6, t: int = 5, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset({
        "input_ids": torch.randint(0, 100, (n, t), generator=g),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "score": torch.randn(n, generator=g),
    })  # fmt: skip


def test_tensor_dict_dataset_batches():
    ds = _ids_dataset()
    assert len(ds) == 6
    item = ds[2]
    assert set(item) == {"input_ids", "attention_mask", "score"}
    assert torch.equal(item["input_ids"], ds.tensors["input_ids"][2])
    index = torch.tensor([4, 0, 4, 1])
    batch = make_batch(ds, index)
    assert set(batch) == {"input_ids", "attention_mask", "score", "index"}
    assert torch.equal(batch["index"], index)
    for name, t in ds.tensors.items():
        assert torch.equal(batch[name], torch.stack([t[int(i)] for i in index]))


def test_tensor_dict_dataset_length_mismatch():
    with pytest.raises(ValueError, match="one length"):
        TensorDictDataset({"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    with pytest.raises(ValueError):
        TensorDictDataset({})


def test_fingerprint_of_tensor_dict_dataset():
    ds = _ids_dataset()
    same = _ids_dataset()
    assert fingerprint(ds) == fingerprint(same)
    changed = {k: v.clone() for k, v in ds.tensors.items()}
    changed["input_ids"][3, 2] += 1
    assert fingerprint(TensorDictDataset(changed)) != fingerprint(ds)
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    swapped = TensorDictDataset({k: v[perm] for k, v in ds.tensors.items()})
    assert not torch.equal(swapped.tensors["input_ids"], ds.tensors["input_ids"])
    assert fingerprint(swapped) != fingerprint(ds)


# --- tokenize_pair / mean_pool / encoder_forward --------------------------------------------------


def test_a_table_of_texts_batches_as_the_in_memory_tokenization(minilm, tmp_path):
    from datasets import Dataset

    from potstill.data.tensors import fingerprint
    from potstill.tasks.embedding import tokenize_texts

    _, _, tok = minilm
    path = tmp_path / "texts.parquet"
    Dataset.from_dict({"sentence": SENTENCES}).to_parquet(str(path))
    from potstill.data.tables import load_table_splits

    table = load_table_splits(path=str(path))["train"]  # memory-mapped, as a run reads it
    rows = tokenize_texts(table, "sentence", tok, tok, 12)
    ref = tokenize_pair(SENTENCES, tok, tok, 12)
    index = torch.tensor([2, 0, 1])
    got, want = rows.batch(index), ref.batch(index)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert fingerprint(rows) == fingerprint(tokenize_texts(table, "sentence", tok, tok, 12))


def test_tokenize_pair_shapes_and_masks(minilm):
    _, _, tok = minilm
    max_length = 12  # SENTENCES[1] is longer than that, SENTENCES[2] much shorter
    ds = tokenize_pair(SENTENCES, tok, tok, max_length)
    assert isinstance(ds, TensorDictDataset)
    assert set(ds.tensors) == {"t_input_ids", "t_attention_mask", "s_input_ids", "s_attention_mask"}
    counts = [len(tok(text)["input_ids"]) for text in SENTENCES]
    assert max(counts) > max_length > min(counts)
    for side in ("t_", "s_"):
        ids, mask = ds.tensors[f"{side}input_ids"], ds.tensors[f"{side}attention_mask"]
        assert ids.shape == mask.shape == (len(SENTENCES), max_length)
        assert mask.sum(1).tolist() == [min(c, max_length) for c in counts]
        for row, text in enumerate(SENTENCES):
            full = tok(text)["input_ids"]
            n = min(len(full), max_length)
            assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
            assert ids[row, n:].eq(tok.pad_token_id).all()
            if len(full) <= max_length:
                assert ids[row, :n].tolist() == full
            else:  # truncated: the start kept, [SEP] last
                assert ids[row, : n - 1].tolist() == full[: n - 1]
                assert ids[row, n - 1].item() == tok.sep_token_id
    assert torch.equal(ds.tensors["t_input_ids"], ds.tensors["s_input_ids"])


def test_mean_pool_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ])  # fmt: skip
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for b in range(4):
        rows = [hidden[b, t] for t in range(7) if mask[b, t] == 1]
        if rows:
            expected[b] = sum(rows) / len(rows)
    got = mean_pool(hidden, mask)
    assert got.shape == (4, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(got).all()  # an all-padding row gives zeros, not NaN


def test_encoder_forward_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    folder, model, tok = minilm
    max_length = 32
    assert all(len(tok(t)["input_ids"]) < max_length for t in SENTENCES)
    ds = tokenize_pair(SENTENCES, tok, tok, max_length)
    batch = make_batch(ds, torch.arange(len(SENTENCES)))
    with torch.no_grad():
        ours = encoder_forward("s_")(model, batch)
        teacher_side = encoder_forward("t_")(model, batch)
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(teacher_side, ours, rtol=0, atol=0)
    st = SentenceTransformer(str(folder), device="cpu")
    # the packaged pipeline ends with Normalize, so compare directions
    assert [type(m).__name__ for m in st][-1] == "Normalize"
    expected = torch.from_numpy(st.encode(SENTENCES, normalize_embeddings=False))
    torch.testing.assert_close(F.normalize(ours, dim=-1), expected, rtol=0, atol=1e-5)
    # embed(): the same embeddings, whatever the batch size
    torch.testing.assert_close(embed(model, ds, encoder_forward("s_"), batch_size=3), ours)


# --- neighbour_agreement --------------------------------------------------------------------------


def _random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _neighbour_reference(student: torch.Tensor, teacher: torch.Tensor, k: int) -> float:
    def neighbours(x: torch.Tensor, i: int) -> set[int]:
        sims = []
        for j in range(len(x)):
            if j != i:
                cos = float(x[i] @ x[j]) / (float(x[i].norm()) * float(x[j].norm()))
                sims.append((cos, j))
        sims.sort(reverse=True)
        return {j for _, j in sims[:k]}

    n = len(student)
    return sum(len(neighbours(student, i) & neighbours(teacher, i)) / k for i in range(n)) / n


def test_neighbour_agreement_identical_and_rotated():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    assert neighbour_agreement(x, x, 5) == 1.0
    assert neighbour_agreement(x @ _random_orthogonal(16, g), x, 5) == pytest.approx(1.0)
    assert neighbour_agreement(3.0 * x, x, 5) == pytest.approx(1.0)


def test_neighbour_agreement_matches_loop_reference():
    g = torch.Generator().manual_seed(1)
    for n, d, k in [(12, 4, 3), (25, 6, 5), (30, 3, 1)]:
        t = torch.randn(n, d, generator=g, dtype=torch.float64)
        s = t + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
        expected = _neighbour_reference(s, t, k)
        assert 0.0 < expected < 1.0
        assert neighbour_agreement(s, t, k) == pytest.approx(expected, abs=1e-6)
        assert neighbour_agreement(t, s, k) == pytest.approx(expected, abs=1e-6)


def test_neighbour_agreement_of_unrelated_embeddings_is_chance():
    g = torch.Generator().manual_seed(2)
    n, k = 200, 10
    s = torch.randn(n, 32, generator=g)
    t = torch.randn(n, 32, generator=g)
    value = neighbour_agreement(s, t, k)
    assert value < 0.15
    assert value == pytest.approx(k / (n - 1), abs=0.04)


# --- similarity_correlation -----------------------------------------------------------------------


def _pairwise_cosines(x: torch.Tensor) -> list[float]:
    out = []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            out.append(float(x[i] @ x[j]) / (float(x[i].norm()) * float(x[j].norm())))
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        pass
    else:
        return float(spearmanr(a, b).statistic)

    def ranks(v: list[float]) -> list[float]:  # average ranks of ties
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in range(i, j + 1):
                r[order[m]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def test_similarity_correlation_identical_and_scaled():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    assert similarity_correlation(x, x) == pytest.approx(1.0, abs=1e-12)
    assert similarity_correlation(2.5 * x, x) == pytest.approx(1.0, abs=1e-12)
    assert similarity_correlation(x @ _random_orthogonal(8, g), x) == pytest.approx(1.0, abs=1e-9)


def test_similarity_correlation_matches_spearman_reference():
    g = torch.Generator().manual_seed(4)
    for n, d, noise in [(15, 5, 0.5), (30, 8, 1.0), (20, 3, 3.0)]:
        t = torch.randn(n, d, generator=g, dtype=torch.float64)
        s = t + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
        a, b = _pairwise_cosines(s), _pairwise_cosines(t)
        assert len(set(a)) == len(a) and len(set(b)) == len(b)  # no ties
        expected = _spearman(a, b)
        assert -1.0 < expected < 1.0
        assert similarity_correlation(s, t) == pytest.approx(expected, abs=1e-9)


def test_similarity_correlation_with_tied_similarities():
    g = torch.Generator().manual_seed(0)
    # four groups of three identical teacher embeddings: cosines exactly 0 or 1, heavily tied
    t = torch.eye(4, dtype=torch.float64)[torch.arange(12) // 3]
    s = t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)
    expected = _spearman(_pairwise_cosines(s), _pairwise_cosines(t))
    assert similarity_correlation(s, t) == pytest.approx(expected, abs=1e-6)


# --- linear_map_cosine ----------------------------------------------------------------------------


def test_linear_map_cosine_exact_affine_map_is_one():
    g = torch.Generator().manual_seed(5)
    d, n_train, n_test = 8, 60, 40
    teacher = torch.randn(n_train + n_test, d, generator=g, dtype=torch.float64) + 0.5
    a = torch.randn(d, d, generator=g, dtype=torch.float64) + 3 * torch.eye(d, dtype=torch.float64)
    assert torch.linalg.matrix_rank(a) == d
    b = torch.randn(d, generator=g, dtype=torch.float64)
    student = teacher @ a + b
    value = linear_map_cosine(
        student[:n_train], teacher[:n_train], student[n_train:], teacher[n_train:]
    )
    assert value == pytest.approx(1.0, abs=1e-9)
    # float32 inputs too (computed in float64 inside)
    value32 = linear_map_cosine(
        student[:n_train].float(),
        teacher[:n_train].float(),
        student[n_train:].float(),
        teacher[n_train:].float(),
    )
    assert value32 == pytest.approx(1.0, abs=1e-4)


def test_linear_map_cosine_matches_numpy_lstsq():
    import numpy as np

    g = torch.Generator().manual_seed(6)
    s_tr, t_tr = torch.randn(50, 4, generator=g), torch.randn(50, 6, generator=g)
    s_te, t_te = torch.randn(20, 4, generator=g), torch.randn(20, 6, generator=g)
    x = np.hstack([s_tr.double().numpy(), np.ones((50, 1))])
    w, *_ = np.linalg.lstsq(x, t_tr.double().numpy(), rcond=None)
    mapped = np.hstack([s_te.double().numpy(), np.ones((20, 1))]) @ w
    ref = t_te.double().numpy()
    cos = (mapped * ref).sum(1) / (np.linalg.norm(mapped, axis=1) * np.linalg.norm(ref, axis=1))
    assert linear_map_cosine(s_tr, t_tr, s_te, t_te) == pytest.approx(float(cos.mean()), abs=1e-9)


def test_linear_map_cosine_unrelated_student_is_low():
    g = torch.Generator().manual_seed(7)
    n_train, n_test = 300, 200
    teacher = torch.randn(n_train + n_test, 16, generator=g)
    student = torch.randn(n_train + n_test, 4, generator=g)
    value = linear_map_cosine(
        student[:n_train], teacher[:n_train], student[n_train:], teacher[n_train:]
    )
    assert value < 0.5


# --- PrecomputedTeacher ---------------------------------------------------------------------------


def _tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(config).eval()


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_precomputed_teacher_equals_live_teacher():
    model = _tiny_bert()
    g = torch.Generator().manual_seed(8)
    n, t = 11, 10
    ids = torch.randint(1, 100, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = ids * mask
    assert (mask == 0).any()
    ds = TensorDictDataset({"t_input_ids": ids, "t_attention_mask": mask})
    taps = {"h": "encoder.layer.*"}
    forward = encoder_forward("t_")

    pre = PrecomputedTeacher(model, ds, forward, taps, batch_size=4)
    assert _no_hooks(model)
    assert pre.feature_names == {"h.0", "h.1"}
    assert pre.logits.shape == (n, 32) and pre.logits.dtype == torch.float32
    assert {v.dtype for v in pre.features.values()} == {torch.float16}
    assert {v.shape for v in pre.features.values()} == {(n, t, 32)}
    assert not any(p.requires_grad for p in model.parameters())

    live = LiveTeacher(model, forward, taps)
    try:
        for index in (torch.tensor([7, 0, 3]), torch.arange(n)):
            batch = make_batch(ds, index)
            a, b = pre.signal(batch), live.signal(batch)
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
            assert set(a.features) == set(b.features) == {"h.0", "h.1"}
            for k in b.features:
                assert a.features[k].dtype == torch.float32
                scale = float(b.features[k].abs().max())
                torch.testing.assert_close(
                    a.features[k], b.features[k], rtol=1e-3, atol=1e-3 * scale
                )
    finally:
        live.close()
    assert _no_hooks(model)


def test_precomputed_teacher_without_taps():
    model = _tiny_bert()
    ids = torch.randint(0, 100, (5, 6), generator=torch.Generator().manual_seed(9))
    ds = TensorDictDataset({"t_input_ids": ids, "t_attention_mask": torch.ones_like(ids)})
    pre = PrecomputedTeacher(model, ds, encoder_forward("t_"), batch_size=2)
    assert pre.feature_names == set() and pre.features == {}
    batch = make_batch(ds, torch.tensor([4, 1]))
    with torch.no_grad():
        expected = encoder_forward("t_")(model, batch)
    signal = pre.signal(batch)
    torch.testing.assert_close(signal.logits, expected, rtol=1e-6, atol=1e-6)
    assert signal.features == {}


# --- the embed recipe -----------------------------------------------------------------------------

RECIPE_COUNTS = {
    "student": {"layers": 3, "q": 1, "k": 1, "v": 1},
    "teacher": {"layers": 12, "q": 1, "k": 1, "v": 1},
}


def test_builtin_embed_recipe_validates_and_builds():
    recipe = load_recipe("minilm-from-mpnet")
    assert isinstance(recipe, EmbedRecipe)
    assert recipe.kind == "embed"
    assert recipe.student.keep == 3
    assert recipe.data.max_length == 48
    assert list(recipe.variants) == [
        "cosine + MSE (projector)",
        "PKT",
        "PKT + hidden",
        "PKT + relations",
    ]
    assert set(recipe.taps.as_taps("student")) == {"layers", "q", "k", "v"}
    built = {
        name: {t.name: t for t in (spec.build(RECIPE_COUNTS) for spec in terms)}
        for name, terms in recipe.variants.items()
    }
    assert set(built["cosine + MSE (projector)"]) == {"embedding_cosine", "embedding_mse"}
    assert set(built["PKT"]) == {"embedding_pkt"}
    hidden = built["PKT + hidden"]["hidden"]
    assert hidden.student_features == ("layers.0", "layers.1", "layers.2")
    assert hidden.teacher_features == ("layers.3", "layers.7", "layers.11")
    relations = built["PKT + relations"]["relations"]
    assert relations.student_features == ("q", "k", "v")
    assert relations.teacher_features == ("q", "k", "v")


def test_embed_recipe_typo_names_the_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        "kind: embed\n"
        "teacher: {model: a}\n"
        "student: {model: b, keeep: 2}\n"
        "variants: {e: [{kind: feature, student: logits, teacher: logits}]}\n"
    )
    with pytest.raises(RecipeError, match=r"student\.keeep") as info:
        load_recipe(path)
    assert "unknown field" in str(info.value)
    with pytest.raises(RecipeError, match=r"data\.max_lenght"):
        load_recipe("minilm-from-mpnet", ["data.max_lenght=32"])


def test_embed_recipe_seed_reaches_training():
    recipe = load_recipe("minilm-from-mpnet", ["seed=7"])
    assert recipe.train.seed == 7


# --- end to end -----------------------------------------------------------------------------------

ROWS = ["teacher", "original student model", "derived, not distilled", "embedding"]


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory):
    if MINILM is None:
        pytest.skip("all-MiniLM-L6-v2 not packaged here: potstill.assets.minilm_l6() is None")
    if not FORTUNES_AVAILABLE:
        pytest.skip(f"no fortune files in {FORTUNES_DIR} (install Debian's fortunes package)")
    recipe = EmbedRecipe.model_validate({
        "kind": "embed",
        "name": "tiny-embed",
        "teacher": {"model": MINILM_NAME},
        "student": {"model": MINILM_NAME, "keep": 2},
        "data": {"train": 48, "val": 24, "max_length": 24},
        "variants": {"embedding": [
            {"kind": "feature", "student": "logits", "teacher": "logits", "loss": "cosine"},
        ]},
        "train": TrainConfig(epochs=1, batch_size=16, progress=False, tensorboard=False),
        "latency_batch": 1,
        "throughput_batch": 8,
    })  # fmt: skip
    run_dir = tmp_path_factory.mktemp("embed_run")
    results = run_recipe(recipe, run_dir)
    return recipe, run_dir, results


def test_embed_run_results(embed_run):
    _, run_dir, results = embed_run
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert list(on_disk["rows"]) == ROWS
    assert (
        on_disk["rows"]["teacher"]["neighbour_agreement@10"]
        == results["rows"]["teacher"]["neighbour_agreement@10"]
    )
    rows = results["rows"]
    assert list(rows) == ROWS
    assert results["kind"] == "embed"
    assert results["data"] == {"train": 48, "val": 24, "max_length": 24, "source": "fortunes"}
    # MiniLM's sentence-transformers config: mean pooling, then normalised, on both sides
    assert results["pooling"]["student"] == {"mode": "mean", "normalize": True}
    assert results["derived_layers"] == {"layers": [0, 5], "teacher_layers": 6}
    assert rows["teacher"]["neighbour_agreement@10"] == 1.0
    assert rows["teacher"]["similarity_spearman"] == pytest.approx(1.0, abs=1e-12)
    # the original student is the teacher's own model: it agrees with it completely
    assert rows["original student model"]["neighbour_agreement@10"] == 1.0
    assert rows["original student model"]["similarity_spearman"] == pytest.approx(1.0, abs=1e-12)
    assert [rows[r]["layers"] for r in ROWS] == [6, 6, 2, 2]
    assert {rows[r]["hidden_size"] for r in ROWS} == {384}
    full = rows["teacher"]["parameters"]
    assert rows["original student model"]["parameters"] == full
    layer = sum(p.numel() for p in hf.load_model(MINILM).encoder.layer[0].parameters())
    assert rows["derived, not distilled"]["parameters"] == full - 4 * layer
    assert rows["embedding"]["parameters"] == full - 4 * layer
    for r in ROWS:
        assert 0.0 <= rows[r]["neighbour_agreement@10"] <= 1.0
        assert -1.0 <= rows[r]["similarity_spearman"] <= 1.0 + 1e-12
        assert -1.0 <= rows[r]["linear_map_cosine"] <= 1.0 + 1e-9
        assert rows[r]["latency_ms"] > 0 and rows[r]["throughput"] > 0
        assert rows[r]["file_bytes"] > 0
    assert rows["embedding"]["steps"] == 3  # 48 texts, batches of 16, one epoch
    assert rows["embedding"]["metrics"] == "embedding/metrics.jsonl"
    assert (run_dir / "embedding" / "metrics.jsonl").is_file()


def test_embed_run_report(embed_run):
    _, run_dir, results = embed_run
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# potstill report: tiny-embed")
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == ROWS
    assert "| 2 × 384 |" in table[3] and "| 6 × 384 |" in table[1]


def test_embed_run_export_reloads_as_the_trained_student(embed_run, minilm):
    from sentence_transformers import SentenceTransformer

    recipe, run_dir, results = embed_run
    _, _, tok = minilm
    export = run_dir / "embedding" / "export"
    assert (export / "model.safetensors").is_file()
    card, meta = read_card(export, recipe)
    assert card.startswith("# tiny-embed: embedding")
    assert (meta.pipeline_tag, meta.library_name) == (
        "sentence-similarity",
        "sentence-transformers",
    )
    assert meta.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    row = results["rows"]["embedding"]
    assert card_metric(meta, "similarity_spearman") == pytest.approx(row["similarity_spearman"])

    # the export holds the trained weights: those of the last checkpoint, not the derived ones
    saved = load_file(export / "model.safetensors")
    pointer = json.loads((run_dir / "embedding" / "checkpoints" / "last.json").read_text())
    trained = load_file(
        run_dir / "embedding" / "checkpoints" / pointer["dir"] / "student.safetensors"
    )
    assert set(saved) == set(trained)
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    untrained = derive(hf.load_model(MINILM), keep=2).state_dict()
    assert set(untrained) == set(saved)
    assert any(not torch.equal(saved[k], untrained[k]) for k in saved)

    reloaded = AutoModel.from_pretrained(export).eval()
    assert reloaded.config.num_hidden_layers == 2
    ds = tokenize_pair(SENTENCES, tok, tok, 32)
    batch = make_batch(ds, torch.arange(len(SENTENCES)))
    with torch.no_grad():
        ours = F.normalize(encoder_forward("s_")(reloaded, batch), dim=-1)
    st = SentenceTransformer(str(export), device="cpu")
    got = torch.from_numpy(st.encode(SENTENCES))
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-5)

    # the reloaded student scores what the run reported, on the run's own held-out texts
    texts = load_fortunes()
    random.Random(recipe.seed).shuffle(texts)
    val = tokenize_pair(texts[48:72], tok, tok, 24)
    t_val = embed(hf.load_model(MINILM), val, encoder_forward("t_"))
    e_val = embed(reloaded, val, encoder_forward("s_"))
    row = results["rows"]["embedding"]
    assert neighbour_agreement(e_val, t_val, 10) == pytest.approx(
        row["neighbour_agreement@10"], abs=1e-6
    )
    assert similarity_correlation(e_val, t_val) == pytest.approx(
        row["similarity_spearman"], abs=1e-6
    )


def test_embed_results_header_and_report(embed_run):
    _, run_dir, results = embed_run
    assert_results_header(results, "embed")
    assert_report_rebuilds(run_dir)


def test_embed_run_keeps_its_folder_and_resumes(embed_run):
    """An embed run refuses a folder holding a run unless told to resume or overwrite; resumed,
    it reloads finished variants instead of training them again, with the same figures."""
    recipe, run_dir, results = embed_run
    export = run_dir / "embedding" / "export" / "model.safetensors"
    stamp = export.stat().st_mtime_ns
    with pytest.raises(RecipeError, match="already holds a run"):
        run_recipe(recipe, run_dir)
    changed = recipe.model_copy(update={"seed": 1})
    with pytest.raises(RecipeError, match="another recipe.*seed"):
        run_recipe(changed, run_dir, resume=True)
    again = run_recipe(recipe, run_dir, resume=True)
    assert export.stat().st_mtime_ns == stamp  # nothing trained again
    row, before = again["rows"]["embedding"], results["rows"]["embedding"]
    for key in ("neighbour_agreement@10", "similarity_spearman", "steps", "objective"):
        assert row[key] == before[key], key


# --- pooling read from the sentence-transformers configuration ---------------------------------


def test_pooling_is_read_from_the_sentence_transformers_config(minilm, tmp_path):
    from potstill.tasks.embedding import Pooling, read_pooling

    assert read_pooling(MINILM) == Pooling("mean", normalize=True)  # Pooling + Normalize modules
    assert read_pooling(tmp_path) == Pooling("mean", normalize=False)  # a plain encoder folder
    with pytest.raises(ValueError, match="pooling mode 'sum' is not one of"):
        Pooling("sum")


@pytest.mark.parametrize("mode", ["cls", "max", "mean_sqrt_len", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_every_pooling_embeds_as_sentence_transformers_does(minilm, tmp_path, mode, normalize):
    from sentence_transformers import SentenceTransformer

    from potstill.tasks.embedding import Pooling, export, read_pooling

    model, tok = hf.load_model(MINILM), minilm[2]
    pooling = Pooling(mode, normalize)
    out = export(model, tmp_path / "st", tokenizer=tok, sentence_transformers_from=MINILM,
                 pooling=pooling)  # fmt: skip
    assert read_pooling(out) == pooling  # the export says how it was trained to embed
    ds = tokenize_pair(SENTENCES, tok, tok, 32)
    batch = make_batch(ds, torch.arange(len(SENTENCES)))
    with torch.no_grad():
        ours = encoder_forward("s_", pooling)(model, batch)
    st = SentenceTransformer(str(out), device="cpu")
    got = torch.from_numpy(st.encode(SENTENCES))
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-5)


def test_pooling_by_hand_on_known_vectors():
    from potstill.tasks.embedding import Pooling, pool

    hidden = torch.tensor(
        [[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]], [[0.0, 2.0], [0.0, 0.0], [5.0, 5.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert pool(hidden, mask, Pooling("cls")).tolist() == [[1.0, 0.0], [0.0, 2.0]]
    assert pool(hidden, mask, Pooling("max")).tolist() == [[3.0, 4.0], [0.0, 2.0]]
    assert pool(hidden, mask, Pooling("mean")).tolist() == [[2.0, 2.0], [0.0, 2.0]]
    assert pool(hidden, mask, Pooling("lasttoken")).tolist() == [[3.0, 4.0], [0.0, 2.0]]
    root2 = 2**0.5
    torch.testing.assert_close(pool(hidden, mask, Pooling("mean_sqrt_len")),
                               torch.tensor([[4 / root2, 4 / root2], [0.0, 2.0]]))  # fmt: skip
    torch.testing.assert_close(pool(hidden, mask, Pooling("lasttoken", True)),
                               torch.tensor([[0.6, 0.8], [0.0, 1.0]]))  # fmt: skip


def test_an_embed_recipe_reads_your_texts(tmp_path):
    if MINILM is None:
        pytest.skip("all-MiniLM-L6-v2 not packaged here")
    texts = [f"sentence number {i} about {w}" for i in range(30) for w in ("cats", "code")]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n")
    pairs = [
        ("a cat sat", "a cat was sitting", 4.5),
        ("a cat sat", "stock prices fell", 0.2),
        ("code compiles", "the program builds", 4.0),
        ("code compiles", "a dog barks", 0.5),
        ("rain today", "it is raining", 4.8),
        ("rain today", "compilers are fast", 0.1),
    ]
    with open(tmp_path / "sts.csv", "w") as f:
        f.write("sentence1,sentence2,score\n" + "".join(f"{a},{b},{c}\n" for a, b, c in pairs))
    recipe = EmbedRecipe.model_validate({
        "kind": "embed", "name": "own-texts",
        "teacher": {"model": MINILM_NAME},
        "student": {"model": MINILM_NAME, "keep": 1, "pooling": {"mode": "cls"}},
        "data": {"source": {"path": str(tmp_path / "texts.txt"), "val_size": 12},
                 "max_length": 16, "train": 20},
        "variants": {"pkt": [{"kind": "pkt"}]},
        "train": TrainConfig(max_steps=2, batch_size=8, progress=False, tensorboard=False),
        "throughput_batch": 4,
        "pairs": {"path": str(tmp_path / "sts.csv")},
    })  # fmt: skip
    results = run_recipe(recipe, tmp_path / "run")
    # the teacher's STS figure, computed by sentence-transformers itself
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM), device="cpu")
    a, b = st.encode([p[0] for p in pairs]), st.encode([p[1] for p in pairs])
    expected = spearmanr((a * b).sum(-1), [p[2] for p in pairs]).statistic
    assert results["rows"]["teacher"]["pairs_spearman"] == pytest.approx(expected, abs=1e-6)
    assert all("pairs_spearman" in r for r in results["rows"].values())
    assert "Scored pairs" in (tmp_path / "run" / "report.md").read_text()
    assert results["data"]["train"] == 20 and results["data"]["val"] == 12  # the empty line: out
    assert results["data"]["source"] == "source"
    assert results["pooling"] == {"teacher": {"mode": "mean", "normalize": True},
                                  "student": {"mode": "cls", "normalize": True}}  # fmt: skip
    from potstill.tasks.embedding import read_pooling

    assert read_pooling(tmp_path / "run" / "pkt" / "export").mode == "cls"


def test_potstill_eval_compares_an_encoder_with_its_teacher_as_sentence_transformers_does(
    embed_run, tmp_path
):
    """``potstill eval`` on an exported encoder and its teacher: neighbour agreement and
    similarity correlation as computed from sentence-transformers' own embeddings; the teacher
    against itself agrees fully."""
    from sentence_transformers import SentenceTransformer
    from typer.testing import CliRunner

    from potstill.cli import app

    _, run_dir, _ = embed_run
    texts = [f"{w} number {i} is here" for i in range(20) for w in ("a cat", "some code")]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    export = run_dir / "embedding" / "export"
    args = ["--data", str(tmp_path / "texts.txt"), "--teacher", str(MINILM)]
    out = CliRunner().invoke(app, ["eval", str(export), *args])
    assert out.exit_code == 0, out.output
    figures = json.loads(out.stdout)
    assert figures["kind"] == "encoder" and figures["texts"] == 40
    s = torch.from_numpy(SentenceTransformer(str(export), device="cpu").encode(texts))
    t = torch.from_numpy(SentenceTransformer(str(MINILM), device="cpu").encode(texts))
    assert figures["neighbour_agreement@10"] == pytest.approx(neighbour_agreement(s, t, 10))
    assert figures["similarity_spearman"] == pytest.approx(similarity_correlation(s, t), abs=1e-4)
    same = json.loads(CliRunner().invoke(app, ["eval", str(MINILM), *args]).stdout)
    assert same["neighbour_agreement@10"] == 1.0
    alone = CliRunner().invoke(app, ["eval", str(export), "--data", str(tmp_path / "texts.txt")])
    assert alone.exit_code == 2 and "give --teacher" in alone.output
