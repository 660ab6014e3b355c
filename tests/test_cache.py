"""The teacher-signal cache (potstill.cache) on token data: a tiny random Llama teacher over
fortunes tokenized by the real SmolLM2 tokenizer. Parity with the live teacher (exact for k = V),
the encodings' errors, the manifest's checks, damaged and missing shards, fan-out in parts,
resuming, killing a real writer at random moments, DataLoader workers, and training from the
cache against training live."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from test_llm_pipeline import SYSTEM, tiny_llama
from torch.utils.data import DataLoader

from potstill.cache import (
    CachedTeacher,
    CacheError,
    Encoding,
    cache_status,
    parse_part,
    write_cache,
)
from potstill.cache.codec import Q8_STEP
from potstill.data.tensors import TensorDictDataset
from potstill.llm.data import fortune_examples, tokenize_examples
from potstill.llm.forward import causal_lm_forward
from potstill.losses.tokens import batch_token_mask, token_divergence
from potstill.signal import TopK
from potstill.teachers import LiveTeacher

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = Encoding(logprobs="float32", compression="none")


@pytest.fixture(scope="module")
def data(tok) -> TensorDictDataset:
    examples = fortune_examples(None, prompt="Tell me a fortune about {category}.", max_chars=160)
    random.Random(3).shuffle(examples)
    return tokenize_examples(examples[:22], tok, 40, fmt="chat", system=SYSTEM)


@pytest.fixture(scope="module")
def teacher(tok):
    return tiny_llama(len(tok), seed=1).eval()


def _write(teacher, data, path, **kw):
    opts = {"unit": "token", "forward": causal_lm_forward, "shard_size": 5, "progress": False}
    return write_cache(teacher, data, path, **{**opts, **kw})


def _dense(topk: TopK, vocab: int) -> torch.Tensor:
    """The distribution a top-k summary describes over the vocabulary (tail left out)."""
    return torch.zeros(*topk.ids.shape[:-1], vocab).scatter(-1, topk.ids, topk.logprobs.exp())


def _batch(data: TensorDictDataset, index: list[int]) -> dict[str, torch.Tensor]:
    return data.batch(torch.tensor(index))


# --- parity with the live teacher ---


def test_full_k_float32_cache_gives_the_live_distribution(teacher, data, tok, tmp_path):
    V = len(tok)
    _write(teacher, data, tmp_path / "c", k=V, encoding=EXACT, batch_size=4, tokenizer=tok)
    cached = CachedTeacher(tmp_path / "c", teacher=teacher, tokenizer=tok, dataset=data)
    live = LiveTeacher(teacher, forward=causal_lm_forward)
    batch = _batch(data, [7, 0, 21, 13, 7])  # other batch make-up than when written
    got, want = cached.signal(batch), live.signal(batch)
    assert got.logits is None and got.topk is not None
    real = batch["attention_mask"].bool()
    p_cached = _dense(got.topk, V)[real]
    p_live = F.softmax(want.logits, dim=-1)[real]
    torch.testing.assert_close(p_cached, p_live, atol=2e-6, rtol=1e-5)
    assert (got.topk.tail_mass == 0).all()
    # the loss and its gradient from the cache equal the dense loss from the live teacher
    mask = batch_token_mask(batch)
    student = torch.randn(*want.logits.shape, generator=torch.Generator().manual_seed(0))
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        s1 = student.clone().requires_grad_()
        s2 = student.clone().requires_grad_()
        a = token_divergence(s1, got.topk, mask, kind, chunk_size=50)
        b = token_divergence(s2, want.logits, mask, kind, chunk_size=50)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        sure = torch.ones_like(student, dtype=torch.bool)
        if kind == "tvd":  # its gradient has sign(q − p): where the two are equal within the
            # cache's float32 roundoff (a few of 10M here) the sign is either; compare the rest
            q, p = F.softmax(student, -1), F.softmax(want.logits, -1)
            close = (q - p).abs() <= 1e-4 * torch.maximum(q, p)
            assert close.float().mean() < 1e-3
            sure = ~close
        torch.testing.assert_close(s1.grad[sure], s2.grad[sure], atol=1e-7, rtol=1e-4)


def test_topk_rows_are_the_teachers_top_k_and_tail(teacher, data, tok, tmp_path):
    k, V = 16, len(tok)
    _write(teacher, data, tmp_path / "c", k=k, encoding=Encoding(logprobs="float32"))
    cached = CachedTeacher(tmp_path / "c")
    batch = _batch(data, list(range(len(data))))
    real = batch["attention_mask"].bool()
    logp = F.log_softmax(LiveTeacher(teacher, forward=causal_lm_forward).signal(batch).logits, -1)
    topk = cached.signal(batch).topk
    want_vals, _ = logp.topk(k, dim=-1)
    got_vals = topk.logprobs.sort(dim=-1, descending=True).values  # zlib keeps them in id order
    torch.testing.assert_close(got_vals[real], want_vals[real], atol=2e-5, rtol=0)
    torch.testing.assert_close(
        logp.gather(-1, topk.ids)[real], topk.logprobs[real], atol=2e-5, rtol=0
    )
    tail = 1 - logp.exp().gather(-1, topk.ids).sum(-1)
    torch.testing.assert_close(topk.tail_mass[real], tail[real], atol=1e-5, rtol=0)
    assert topk.ids.dtype == torch.int64 and topk.ids.max() < V


def test_lossy_encodings_stay_within_their_documented_error(teacher, data, tok, tmp_path):
    k = 64
    exact = None
    for logprobs in ("float32", "float16", "q8"):
        for compression in ("none", "zlib"):
            path = tmp_path / f"{logprobs}-{compression}"
            enc = Encoding(logprobs=logprobs, compression=compression)
            _write(teacher, data, path, k=k, encoding=enc)
            items = [CachedTeacher(path)[i] for i in range(len(data))]
            ids = torch.cat([it["ids"] for it in items])
            order = ids.argsort(-1)  # compare entry by entry in id order
            lp = torch.cat([it["logprobs"] for it in items]).gather(-1, order)
            tail = torch.cat([it["tail"] for it in items])
            if exact is None:
                exact = (ids.gather(-1, order), lp, tail)
                continue
            assert torch.equal(ids.gather(-1, order), exact[0]), (logprobs, compression)
            err = (lp - exact[1]).abs()
            bound = {"float32": 1e-6, "float16": 2e-2, "q8": Q8_STEP / 2 + 2e-3}[logprobs]
            assert err.max() <= bound, (logprobs, compression, err.max())
            # the decoded buckets are a distribution, and close to the exact one in KL
            total = lp.exp().sum(-1) + tail
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
            p = torch.cat([exact[1].exp(), exact[2].unsqueeze(-1)], -1)
            q = torch.cat([lp.exp(), tail.unsqueeze(-1)], -1)
            kl = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean()
            assert kl < {"float32": 1e-7, "float16": 1e-4, "q8": 1e-3}[logprobs], (logprobs, kl)


def test_compressed_blocks_read_back_any_example_in_any_order(teacher, data, tmp_path):
    fixed = _write(teacher, data, tmp_path / "fixed", k=16, encoding=Encoding(compression="none"))
    blocks = _write(teacher, data, tmp_path / "blocks", k=16, encoding=Encoding(block=2))
    assert blocks.bytes < fixed.bytes
    a, b = CachedTeacher(tmp_path / "fixed"), CachedTeacher(tmp_path / "blocks")
    order = list(range(len(data))) * 2
    random.Random(1).shuffle(order)
    for i in order:  # shards of 5 examples: blocks of 2, 2 and 1, read from cold and warm
        x, y = a[i], b[i]
        sort_x, sort_y = x["ids"].argsort(-1), y["ids"].argsort(-1)
        assert torch.equal(x["ids"].gather(-1, sort_x), y["ids"].gather(-1, sort_y)), i
        # the same stored values; renormalised in blocks or row ranges (last-bit differences)
        lx, ly = x["logprobs"].gather(-1, sort_x), y["logprobs"].gather(-1, sort_y)
        torch.testing.assert_close(lx, ly, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x["tail"], y["tail"], atol=1e-7, rtol=1e-6)
    y = b[3]
    y["logprobs"].zero_()  # rows handed out are copies: the reader's kept blocks stay intact
    assert not torch.equal(b[3]["logprobs"], y["logprobs"])


def test_compression_and_small_ids_shrink_the_cache(teacher, data, tmp_path):
    sizes = {}
    for compression in ("none", "zlib"):
        st = _write(
            teacher, data, tmp_path / compression, k=64, encoding=Encoding(compression=compression)
        )
        sizes[compression] = st.bytes / st.positions
    shard = next((tmp_path / "none" / "shards").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("ids").get_dtype() == "U16"  # V = 49,152 fits in 16 bits
        assert f.get_slice("logprobs").get_dtype() == "U8"
    # fixed width: 64 × (2 + 1) bytes + top and tail (float16) + offsets
    assert 196 <= sizes["none"] < 200
    assert sizes["zlib"] < 0.8 * sizes["none"]


def test_a_vocabulary_over_65536_stores_int32_ids(data, tmp_path):
    big = tiny_llama(70_000, seed=2).eval()
    _write(big, data, tmp_path / "c", k=4, encoding=Encoding(compression="none"))
    shard = next((tmp_path / "c" / "shards").glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("ids").get_dtype() == "I32"
    topk = CachedTeacher(tmp_path / "c").signal(_batch(data, [0, 1])).topk
    assert topk.ids.max() < 70_000


# --- what a cache means: the manifest's checks ---


def test_a_cache_used_with_other_inputs_names_the_field(teacher, data, tok, tmp_path):
    path = tmp_path / "c"
    _write(teacher, data, path, k=8, tokenizer=tok)
    CachedTeacher(path, teacher=teacher, tokenizer=tok, dataset=data)

    other = tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    with pytest.raises(CacheError, match="teacher_weights differs"):
        CachedTeacher(path, teacher=other)
    deeper = tiny_llama(len(tok), seed=1, layers=3)
    with pytest.raises(CacheError, match="teacher_weights differs"):
        CachedTeacher(path, teacher=deeper)

    other_tok = type(tok).from_pretrained(tok.name_or_path)
    other_tok.chat_template = "{{ messages }}"
    with pytest.raises(CacheError, match="tokenizer differs"):
        CachedTeacher(path, tokenizer=other_tok)

    longer = TensorDictDataset(
        {k: F.pad(v, (0, 4)) if v.dim() == 2 else v for k, v in data.tensors.items()},
        trim_by="attention_mask",
    )
    with pytest.raises(CacheError, match="max_length differs"):
        CachedTeacher(path, dataset=longer)
    edited = TensorDictDataset({k: v.clone() for k, v in data.tensors.items()})
    edited.tensors["input_ids"][3, 5] += 1
    with pytest.raises(CacheError, match="data differs"):
        CachedTeacher(path, dataset=edited)
    with pytest.raises(CacheError, match="num_examples differs"):
        CachedTeacher(path, dataset=TensorDictDataset({k: v[:-1] for k, v in data.tensors.items()}))
    with pytest.raises(CacheError, match="k differs"):
        CachedTeacher(path, expect={"k": 64})
    # prompt lengths do not change what the teacher sees: the same cache serves
    masked = TensorDictDataset({**data.tensors, "prompt_length": data.tensors["prompt_length"] + 1})
    CachedTeacher(path, dataset=masked)
    # writing into it with other settings is refused the same way
    with pytest.raises(CacheError, match="k differs"):
        _write(teacher, data, path, k=16, tokenizer=tok)


def test_damaged_missing_and_foreign_shards_are_named(teacher, data, tmp_path):
    path = tmp_path / "c"
    _write(teacher, data, path, k=8)
    shard = path / "shards" / "shard-000002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=r"shard 2 \(shards/shard-000002.safetensors\) is damaged"):
        CachedTeacher(path)
    CachedTeacher(path, verify=False)  # same size: only the checksum sees it
    # a rerun of the writer finds it, rewrites it, and the cache reads again
    _write(teacher, data, path, k=8)
    CachedTeacher(path)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard 2 \(shards/shard-000002.safetensors\) is missing"):
        CachedTeacher(path)
    _write(teacher, data, path, k=8)
    # a shard of another cache copied in: its checksum differs from the record …
    other = tmp_path / "other"
    _write(tiny_llama(49152, seed=5), data, other, k=8)
    one = path / "shards" / "shard-000001.safetensors"
    one.write_bytes((other / "shards" / "shard-000001.safetensors").read_bytes())
    with pytest.raises(CacheError, match=r"shard 1 \(shards/shard-000001.safetensors\) is"):
        CachedTeacher(path)
    # … and with records made to match it, its header (cache id, shard number) refuses it
    size = json.loads((path / "manifest.json").read_text())["shard_size"]
    _match_record(path, 1)
    cached = CachedTeacher(path)  # the records pass: size and checksum are the file's
    with pytest.raises(CacheError, match=f"{one} is not shard 1 of teacher cache {path}"):
        cached[size]  # the first example of shard 1
    # the same for one of this cache's own shards under another number
    one.write_bytes((path / "shards" / "shard-000002.safetensors").read_bytes())
    _match_record(path, 1)
    with pytest.raises(CacheError, match=f"{one} is not shard 1 of teacher cache {path}"):
        CachedTeacher(path)[size]
    assert CachedTeacher(path)[0]  # the other shards read as before


def _match_record(path: Path, j: int) -> None:
    """Rewrite shard ``j``'s record (size, checksum) to match the file now in its place."""
    from potstill.io import sha256_file

    for part in (path / "parts").glob("part-*.json"):
        record = json.loads(part.read_text())
        if str(j) in record["shards"]:
            file = path / record["shards"][str(j)]["file"]
            record["shards"][str(j)].update(bytes=file.stat().st_size, sha256=sha256_file(file))
            part.write_text(json.dumps(record))


def test_a_folder_that_is_not_a_cache_is_refused(teacher, data, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a potstill teacher cache"):
        CachedTeacher(tmp_path / "x")
    with pytest.raises(CacheError, match="not a teacher cache"):
        _write(teacher, data, tmp_path / "x", k=8)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


# --- fan-out, resuming, killing ---


def _same_shards(a: Path, b: Path) -> bool:
    """Both caches hold the same shards: same names, metadata and tensors (the bytes of the
    safetensors header may order metadata keys differently)."""
    names = sorted(p.name for p in (a / "shards").glob("*.safetensors"))
    if names != sorted(p.name for p in (b / "shards").glob("*.safetensors")):
        return False
    for name in names:
        with (
            safe_open(str(a / "shards" / name), "pt") as fa,
            safe_open(str(b / "shards" / name), "pt") as fb,
        ):
            if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
                return False
            if not all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys()):
                return False
    return True


def test_parts_fill_one_cache_and_an_incomplete_cache_is_refused(teacher, data, tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    _write(teacher, data, whole, k=8)
    st = _write(teacher, data, parted, k=8, part=(1, 3))
    assert st.num_shards == 5 and st.done == [1, 4] and not st.complete
    with pytest.raises(CacheError, match=r"incomplete: 2 of 5 shards written \(missing 0, 2–3\)"):
        CachedTeacher(parted)
    cached = CachedTeacher(parted, allow_incomplete=True)
    assert cached.available.nonzero().flatten().tolist() == [5, 6, 7, 8, 9, 20, 21]
    sub = cached.subset(data)
    assert sub.tensors["cache_index"].tolist() == [5, 6, 7, 8, 9, 20, 21]
    batch = sub.batch(torch.tensor([0, 6]))
    full = CachedTeacher(whole)
    got = cached.signal(batch).topk
    want = full.signal({**batch, "index": batch["cache_index"]}).topk
    assert torch.equal(got.ids, want.ids)
    with pytest.raises(CacheError, match="shard 0 is not written"):
        cached[0]
    _write(teacher, data, parted, k=8, part=(0, 3))
    _write(teacher, data, parted, k=8, part=(2, 3))
    assert cache_status(parted).complete
    assert sorted(p.name for p in (parted / "parts").glob("*.json")) == [
        "part-00000-of-00003.json", "part-00001-of-00003.json", "part-00002-of-00003.json"
    ]  # fmt: skip
    assert _same_shards(parted, whole)  # deterministic: the same cache


def test_a_rerun_skips_finished_shards(teacher, data, tmp_path):
    path = tmp_path / "c"
    _write(teacher, data, path, k=8)
    before = {p.name: p.stat().st_mtime_ns for p in (path / "shards").iterdir()}
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        st = _write(teacher, data, path, k=8)
    finally:
        hook.remove()
    assert st.complete and len(calls) == 1  # only the probe batch that reads the vocabulary
    assert {p.name: p.stat().st_mtime_ns for p in (path / "shards").iterdir()} == before


def test_parts_starting_together_share_one_manifest(teacher, data, tmp_path):
    from potstill.io import atomic_create_text

    assert atomic_create_text(tmp_path / "m.json", "first")
    assert not atomic_create_text(tmp_path / "m.json", "second")
    assert (tmp_path / "m.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left
    # another part got as far as its folders (and a half-written manifest) first: fine
    path = tmp_path / "c"
    (path / "parts").mkdir(parents=True)
    (path / ".manifest.json.x1y2.tmp").write_text("{")
    _write(teacher, data, path, k=8, part=(0, 2))
    # a part asking for another shard size than the manifest's is refused, not mixed in
    with pytest.raises(CacheError, match="shard_size differs"):
        _write(teacher, data, path, k=8, part=(1, 2), shard_size=7)


def test_parse_part():
    assert parse_part("0/4") == (0, 4) and parse_part("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_part(bad)


WRITER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_llm_pipeline import tiny_llama
from potstill.cache import write_cache
from potstill.llm.forward import causal_lm_forward
from potstill.data.tensors import TensorDictDataset
torch.set_num_threads(1)
data = TensorDictDataset(
    {{k: torch.load({data!r}, weights_only=True)[k] for k in ("input_ids", "attention_mask")}},
    trim_by="attention_mask",
)
teacher = tiny_llama(49152, seed=1).eval()
slow = lambda m, b: (time.sleep(0.02), causal_lm_forward(m, b))[1]
write_cache(teacher, data, {path!r}, unit="token", k=32, forward=slow, shard_size=1,
            batch_size=1, progress=False)
"""


def test_killing_a_real_writer_never_leaves_a_bad_shard(teacher, data, tmp_path):
    torch.save(dict(data.tensors), tmp_path / "data.pt")
    path = tmp_path / "killed"
    script = tmp_path / "writer.py"
    tests = str(Path(__file__).parent)
    script.write_text(WRITER.format(tests=tests, data=str(tmp_path / "data.pt"), path=str(path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script)], env=env)
        # kill at a random moment once the writer has started writing shards
        t0 = time.monotonic()
        while proc.poll() is None and not any((path / "parts").glob("*.json")):
            if time.monotonic() - t0 > 120:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # whatever it left, every shard the reader accepts is verified and readable
        if (path / "manifest.json").exists():
            partial = CachedTeacher(path, allow_incomplete=True, verify=True)
            for i in partial.available.nonzero().flatten().tolist():
                partial[i]
        if cache_status(path).complete:
            break
    assert kills >= 2, "the writer finished before it could be killed; slow it down"
    proc = subprocess.run([sys.executable, str(script)], env=env, timeout=300)
    assert proc.returncode == 0
    whole = tmp_path / "whole"
    _write(teacher, data, whole, k=32, shard_size=1, batch_size=1)
    assert _same_shards(path, whole)
    leftovers = [p.name for p in path.rglob("*") if p.name.startswith(".")]
    # a temporary file of a killed write may stay behind, but is never read as a shard
    assert all(name.endswith(".tmp") for name in leftovers), leftovers


# --- reading: DataLoader workers, training ---


def _items(batch):
    return batch


def test_dataloader_workers_read_the_same_rows(teacher, data, tmp_path):
    _write(teacher, data, tmp_path / "c", k=8)
    cached = CachedTeacher(tmp_path / "c")
    cached[0]  # an open shard in the parent must not leak into the workers
    loader = DataLoader(cached, batch_size=4, num_workers=2, collate_fn=_items)
    got = [item for batch in loader for item in batch]
    assert len(got) == len(data)
    for i, item in enumerate(got):
        want = cached[i]
        assert item.keys() == want.keys()
        for name in want:
            assert torch.equal(item[name], want[name]), (i, name)


def test_example_cache_stores_tapped_features(digits, teacher_model, tmp_path):
    path = tmp_path / "c"
    st = write_cache(
        teacher_model, digits.val, path, k=None, taps={"h": "1"}, progress=False,
        encoding=Encoding(features="float32"), shard_size=100,
    )  # fmt: skip
    assert st.num_shards == -(-len(digits.val) // 100)
    cached = CachedTeacher(path, teacher=teacher_model, dataset=digits.val)
    assert cached.feature_names == {"h"}
    live = LiveTeacher(teacher_model, taps={"h": "1"})
    batch = {"input": digits.val.tensors[0][[3, 250, 0]], "index": torch.tensor([3, 250, 0])}
    got, want = cached.signal(batch), live.signal(batch)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.features["h"], want.features["h"], atol=1e-6, rtol=1e-6)
    live.close()
    # a batch of a dense example cache is one gather per shard: the same rows as reading the
    # examples one by one, across shards and in any order, also after pickling (workers)
    index = torch.randperm(len(digits.val), generator=torch.Generator().manual_seed(0))[:64]
    for reader in (cached, pickle.loads(pickle.dumps(cached))):
        got = reader.signal({"index": index})
        one_by_one = [reader[int(i)] for i in index]
        torch.testing.assert_close(got.logits, torch.cat([r["logits"] for r in one_by_one]))
        torch.testing.assert_close(
            got.features["h"], torch.cat([r["feature.h"] for r in one_by_one])
        )
    with pytest.raises(IndexError, match="outside"):
        cached.signal({"index": torch.tensor([0, len(digits.val)])})


# --- recipes and the command line ---


def _lm_recipe(llama_dir: Path, fortunes: Path, cache: Any = None, **over: Any):
    from test_llm_pipeline import recipe_dict

    from potstill.recipe.causal_lm import LMRecipe

    data = recipe_dict(
        llama_dir,
        data={"folder": str(fortunes), "train": 6, "val": 2},
        variants={"fkl": [{"kind": "fkl"}], "jsd": [{"kind": "jsd"}]},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
        **{"train": {"max_steps": 3, "batch_size": 3}, **over},
    )
    if cache is not None:
        data["teacher"]["cache"] = cache
    return LMRecipe.model_validate(data)


@pytest.fixture(scope="module")
def llama_dir(tok, tmp_path_factory) -> Path:
    from test_llm_pipeline import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tok, len(tok), seed=0)


@pytest.fixture(scope="module")
def fortunes(tmp_path_factory) -> Path:
    from test_llm_pipeline import small_fortunes

    return small_fortunes.__wrapped__(tmp_path_factory)


def test_recipe_trains_the_same_from_a_full_cache_as_live(llama_dir, fortunes, tmp_path):
    from potstill.runs import run as run_recipe

    # SGD: Adam divides each gradient by its own running size, so float rounding in gradients
    # that are nearly 0 (tokens both models find unlikely) would decide whole update steps
    sgd = {"max_steps": 3, "batch_size": 3, "optimizer": {"name": "sgd", "lr": 0.5}}
    live = run_recipe(_lm_recipe(llama_dir, fortunes, train=sgd), tmp_path / "live")
    exact = {"k": 49152, "logprobs": "float32", "compression": "none", "shard_size": 2}
    recipe = _lm_recipe(llama_dir, fortunes, cache=exact, train=sgd)
    cached = run_recipe(recipe, tmp_path / "cached")
    info = cached["teacher_cache"]
    assert info["path"] == str(tmp_path / "cached" / "teacher-cache")
    assert cache_status(info["path"]).complete and info["examples"] == 6
    assert live["teacher_cache"] is None
    init = load_file(llama_dir / "model.safetensors")
    for name in ("fkl", "jsd"):
        a = load_file(tmp_path / "live" / name / "export" / "model.safetensors")
        b = load_file(tmp_path / "cached" / name / "export" / "model.safetensors")
        assert not torch.equal(a["model.norm.weight"], init["model.norm.weight"])  # it trained
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    md = (tmp_path / "cached" / "report.md").read_text()
    assert (
        "read from its cache" in md
        and "Teacher: run live" in (tmp_path / "live" / "report.md").read_text()
    )


@pytest.fixture(scope="module")
def peaked_llama_dir(tok, tmp_path_factory) -> Path:
    """The tiny Llama with its final norm's weight × 8: logits 8 times as spread, so its
    next-token distributions are peaked as a trained LM's are (top-1 about 0.65, the mass
    beyond the top 64 about 0.1 %), where the random one's are nearly flat (97 % beyond)."""
    model = tiny_llama(len(tok), seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(8)
    folder = tmp_path_factory.mktemp("peaked-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_recipe_with_the_default_top_k_cache_trains_close_to_live(
    peaked_llama_dir, fortunes, tmp_path
):
    """The default cache (top 64, 8-bit log-probabilities) of a teacher as peaked as a real
    LM trains as the live teacher does: the same logged losses and held-out KL within 2 %, the
    same weight updates within 5 % (measured: 0.6 % and 0.4–1.2 %). SGD: Adam would turn the
    rounding of near-0 gradients into whole steps."""
    from potstill.runs import run as run_recipe

    llama_dir = peaked_llama_dir
    sgd = {"max_steps": 3, "batch_size": 3, "optimizer": {"name": "sgd", "lr": 0.05}}
    live = run_recipe(_lm_recipe(llama_dir, fortunes, train=sgd), tmp_path / "live")
    recipe = _lm_recipe(llama_dir, fortunes, cache=True, train=sgd)
    assert recipe.teacher.cache.k == 64 and recipe.teacher.cache.logprobs == "q8"
    results = run_recipe(recipe, tmp_path / "run")
    assert results["teacher_cache"]["bytes_per_token"] < 200
    from potstill.students import spread_layers

    (kept,) = spread_layers(2, 1)  # the teacher layer the 1-layer student starts from
    layer = f"model.layers.{kept}."
    init = {k.replace(layer, "model.layers.0."): v
            for k, v in load_file(llama_dir / "model.safetensors").items()
            if not k.startswith("model.layers.") or k.startswith(layer)}  # fmt: skip
    for name in ("fkl", "jsd"):
        rows = [
            [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
            for run in (tmp_path / "live", tmp_path / "run")
        ]
        losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
        assert losses[0] and losses[1] == pytest.approx(losses[0], rel=0.02), name
        kl = [r["rows"][name]["kl_to_teacher"] for r in (live, results)]
        assert kl[1] == pytest.approx(kl[0], rel=0.02), name
        a, b = (load_file(run / name / "export" / "model.safetensors")
                for run in (tmp_path / "live", tmp_path / "run"))  # fmt: skip
        assert a.keys() == b.keys() == init.keys()
        moved = [torch.cat([(w[k] - init[k]).flatten() for k in sorted(init)]) for w in (a, b)]
        assert moved[0].norm() > 0 and (moved[1] - moved[0]).norm() < 0.05 * moved[0].norm()
    # a second run reuses the shared cache as it is (nothing rewritten)
    shared = tmp_path / "run" / "teacher-cache"
    stamps = {p: p.stat().st_mtime_ns for p in (shared / "shards").iterdir()}
    again = _lm_recipe(llama_dir, fortunes, cache={"path": str(shared)})
    run_recipe(again, tmp_path / "again")
    assert {p: p.stat().st_mtime_ns for p in (shared / "shards").iterdir()} == stamps
    # … but refuses it for another k, naming the field
    other = _lm_recipe(llama_dir, fortunes, cache={"path": str(shared), "k": 8})
    with pytest.raises(CacheError, match="k differs"):
        run_recipe(other, tmp_path / "other")


def test_cli_cache_from_a_recipe_in_parts_then_train(llama_dir, fortunes, tmp_path):
    import yaml
    from test_llm_pipeline import recipe_dict
    from typer.testing import CliRunner

    from potstill.cli import app

    cache_dir = tmp_path / "shared-cache"
    data = recipe_dict(
        llama_dir,
        data={"folder": str(fortunes), "train": 6, "val": 2},
        variants={"fkl": [{"kind": "fkl"}]},
        train={"max_steps": 2, "batch_size": 3},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
    )
    data["teacher"]["cache"] = {"path": str(cache_dir), "shard_size": 2, "allow_incomplete": True}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    runner = CliRunner()
    result = runner.invoke(app, ["cache", str(path), "--shard", "1/2"])
    assert result.exit_code == 0, result.output
    assert "1 of 3 shards written" in result.output
    result = runner.invoke(app, ["cache", str(path), "--status"])
    assert "1 of 3 shards written" in result.output and "missing shards: 2" in result.output
    # allow_incomplete: the run trains on the examples the cache holds
    result = runner.invoke(app, ["distill", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (
        json.loads((tmp_path / "run" / "results.json").read_text())["teacher_cache"]["examples"]
        == 2
    )
    result = runner.invoke(app, ["cache", str(path), "--shard", "0/2"])
    assert "3 of 3 shards written" in result.output
    result = runner.invoke(app, ["cache", str(path), "--shard", "5/2"])
    assert result.exit_code == 2 and "--shard" in result.output


def test_cli_cache_from_teacher_and_jsonl(llama_dir, tmp_path):
    from typer.testing import CliRunner

    from potstill.cli import app

    rows = [{"prompt": "Say hi.", "response": "Hi there!"}, {"text": "Plain text, no prompt."}]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "c"
    args = ["cache", "--teacher", str(llama_dir), "--data", str(data), "--out", str(out)]
    opts = ["--k", "8", "--format", "text", "--max-length", "32", "--tap", "h=model.layers.0"]
    result = CliRunner().invoke(app, [*args, *opts])
    assert result.exit_code == 0, result.output
    assert "parts: 0/1 wrote 1" in result.output
    cached = CachedTeacher(out)
    assert cached.k == 8 and cached.unit == "token" and len(cached) == 2
    assert cached.feature_names == {"h"}
    rows = cached[1]
    assert rows["feature.h"].shape == (rows["ids"].shape[0], 32)  # hidden size of the tiny Llama
    result = CliRunner().invoke(app, [*args, "--tap", "h", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--tap must look like" in result.output
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    bad = [
        "cache",
        "--teacher",
        str(llama_dir),
        "--data",
        str(tmp_path / "bad.jsonl"),
        "--out",
        str(tmp_path / "d"),
    ]
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2 and "bad.jsonl:1" in result.output


def test_classifier_terms_read_a_top_k_example_cache(digits, teacher_model, tmp_path):
    from potstill.losses.terms import divergence_term, kd_term
    from potstill.signal import StudentView

    x = digits.val.tensors[0][:40]
    batch = {"input": x, "index": torch.arange(40)}
    student = torch.randn(40, 10, generator=torch.Generator().manual_seed(0))
    live = LiveTeacher(teacher_model).signal(batch)
    full = tmp_path / "full"
    write_cache(teacher_model, digits.val, full, k=10, encoding=EXACT, progress=False)
    cached = CachedTeacher(full, teacher=teacher_model, dataset=digits.val).signal(batch)
    assert cached.logits is None and cached.topk.k == 10
    for term in (kd_term(4.0), divergence_term("jsd", temperature=2.0)):
        want = term.fn(StudentView(student), live, batch)
        got = term.fn(StudentView(student), cached, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # top-3: the KL on 4 buckets, never more than on all 10 classes (bucketing loses detail)
    write_cache(teacher_model, digits.val, tmp_path / "k3", k=3, encoding=EXACT, progress=False)
    top3 = CachedTeacher(tmp_path / "k3").signal(batch)
    dense = kd_term(1.0).fn(StudentView(student), live, batch)
    bucketed = kd_term(1.0).fn(StudentView(student), top3, batch)
    assert 0 < bucketed <= dense + 1e-6
    with pytest.raises(ValueError, match="'kd' term needs the teacher's logits"):
        kd_term(1.0).fn(StudentView(student), None, batch)


def test_a_teacher_saved_and_reloaded_elsewhere_keeps_its_cache(teacher, data, tok, tmp_path):
    """What a resumed run does: the teacher reloaded from its export (another _name_or_path,
    architectures rewritten by save_pretrained) is the same teacher; another config is not."""
    from transformers import AutoModelForCausalLM

    from potstill.cache import config_fingerprint

    path = tmp_path / "c"
    _write(teacher, data, path, k=8, tokenizer=tok)
    teacher.save_pretrained(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "moved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moved").eval()
    assert reloaded.config.to_dict()["_name_or_path"] != teacher.config.to_dict()["_name_or_path"]
    CachedTeacher(path, teacher=reloaded, tokenizer=tok, dataset=data)  # accepted
    _write(reloaded, data, path, k=8, tokenizer=tok)  # and continued
    other = tiny_llama(len(tok), seed=1)
    other.config.rope_theta = 1234.0  # a config that changes what it computes
    assert config_fingerprint(other) != config_fingerprint(teacher)
    # a cache written before, with the folder in its config fingerprint, still matches
    legacy = config_fingerprint(teacher, legacy=True)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["meaning"]["teacher_config"] = legacy
    (path / "manifest.json").write_text(json.dumps(manifest))
    CachedTeacher(path, teacher=teacher, dataset=data)
    with pytest.raises(CacheError, match="teacher_config differs"):
        CachedTeacher(path, teacher=reloaded)  # the legacy form named the old folder
