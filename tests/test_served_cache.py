"""Teacher caches filled from a served teacher (``potstill cache --teacher-server``) against
the small vLLM-format server of tests/fake_server.py: the same rows as a cache the local
teacher fills (ids exact, log-probabilities and tail to float32 rounding; the server's top-k
narrowed to the cache's k with the dropped mass in the tail), in parts, recorded as served (a
local teacher refuses it), with the teacher's weights never loaded, and trained from by a
recipe as from the local cache."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("openai")
import test_served  # noqa: E402
from fake_server import FakeServer  # noqa: E402
from test_served import NAME, _recipe  # noqa: E402

from potstill.cache import CachedTeacher, CacheError, Encoding, write_cache  # noqa: E402
from potstill.cache.codec import Q8_STEP  # noqa: E402
from potstill.data.tensors import make_batch  # noqa: E402
from potstill.llm.data import LMExample, tokenize_examples  # noqa: E402
from potstill.llm.forward import causal_lm_forward  # noqa: E402
from potstill.served import ServedTeacher  # noqa: E402

K = 8
EXACT = Encoding(logprobs="float32", compression="none")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    return test_served.model.__wrapped__(tok)


@pytest.fixture(scope="module")
def llama_dir(model, tok, tmp_path_factory):
    return test_served.llama_dir.__wrapped__(model, tok, tmp_path_factory)


@pytest.fixture(scope="module")
def data(tok):
    examples = [
        LMExample(f"Fortune {i}.", "Never trust a computer you cannot lift." * (1 + i % 3))
        for i in range(7)
    ]
    return tokenize_examples(examples, tok, 40, fmt="text")


@pytest.fixture
def server(model):
    with FakeServer(model, NAME) as s:
        yield s


def fill(teacher, data, path, **kw):
    kw.setdefault("k", K)
    kw.setdefault("encoding", EXACT)
    return write_cache(
        teacher, data, path, unit="token", forward=causal_lm_forward, shard_size=2,
        batch_size=2, progress=False, **kw,
    )  # fmt: skip


def signals(path, data):
    cached = CachedTeacher(path)
    return cached.signal(make_batch(data, torch.arange(len(data)))).topk


@pytest.mark.parametrize("encoding", [EXACT, Encoding()], ids=["float32", "q8-zlib"])
def test_a_cache_filled_from_the_server_equals_the_local_ones(
    server, model, data, tok, tmp_path, encoding
):
    """The server asked for its top 12, the cache keeping 8, filled in two parts: every shard
    written, the same ids as the local teacher's cache, log-probabilities and tail equal to
    float32 rounding (q8: to one quantisation step)."""
    fill(model, data, tmp_path / "local", encoding=encoding, tokenizer=tok)
    teacher = ServedTeacher(server.url, NAME, top_k=K + 4)
    try:
        first = fill(teacher, data, tmp_path / "served", encoding=encoding, tokenizer=tok,
                     part=(0, 2), vocab_size=model.config.vocab_size)  # fmt: skip
        assert not first.complete and len(first.done) == 2  # shards 0 and 2 of 4
        done = fill(teacher, data, tmp_path / "served", encoding=encoding, tokenizer=tok,
                    part=(1, 2), vocab_size=model.config.vocab_size)  # fmt: skip
    finally:
        teacher.close()
    assert done.complete and done.num_shards == 4
    real = make_batch(data, torch.arange(len(data)))["attention_mask"].bool()
    local, served = signals(tmp_path / "local", data), signals(tmp_path / "served", data)
    assert torch.equal(served.ids[real], local.ids[real])
    step = Q8_STEP if encoding.lossy else 0.0
    torch.testing.assert_close(served.logprobs[real], local.logprobs[real], rtol=1e-5,
                               atol=step + 1e-5)  # fmt: skip
    torch.testing.assert_close(served.tail_mass[real], local.tail_mass[real], rtol=1e-3,
                               atol=1e-5)  # fmt: skip
    assert served.tail_mass[real].min() > 0  # the mass beyond the top 8 is there


def test_a_served_cache_is_recorded_as_served_and_a_local_teacher_refuses_it(
    server, model, data, tok, tmp_path
):
    teacher = ServedTeacher(server.url, NAME, top_k=K)
    try:
        fill(teacher, data, tmp_path / "c", tokenizer=tok, vocab_size=model.config.vocab_size)
        fingerprint = teacher.fingerprint()
    finally:
        teacher.close()
    meaning = json.loads((tmp_path / "c" / "manifest.json").read_text())["meaning"]
    assert meaning["teacher_weights"] == fingerprint and fingerprint.startswith("served:")
    assert meaning["teacher_config"] is None
    # the same model served from another address has the same fingerprint: its caches hold
    with FakeServer(model, NAME) as other:
        again = ServedTeacher(other.url, NAME, top_k=K)
        assert again.fingerprint() == fingerprint
        again.close()
    with FakeServer(model, "another-name") as other:
        renamed = ServedTeacher(other.url, "another-name", top_k=K)
        assert renamed.fingerprint() != fingerprint
        renamed.close()
    with pytest.raises(CacheError, match="teacher_weights differs"):
        CachedTeacher(tmp_path / "c", teacher=model)
    with pytest.raises(CacheError, match="teacher_weights differs"):
        fill(model, data, tmp_path / "c", tokenizer=tok)  # a local teacher continuing it


def test_what_a_served_teacher_cannot_fill_is_named(server, model, data, tmp_path):
    teacher = ServedTeacher(server.url, NAME, top_k=K)
    v = model.config.vocab_size
    try:
        with pytest.raises(ValueError, match=r"teacher.cache.k = 9 is more than .*top_k = 8"):
            fill(teacher, data, tmp_path / "a", k=9, vocab_size=v)
        with pytest.raises(ValueError, match="dense logits needs a local one"):
            fill(teacher, data, tmp_path / "b", k=None, vocab_size=v)
        with pytest.raises(ValueError, match="taps needs a local one"):
            fill(teacher, data, tmp_path / "c", taps={"h": "model.norm"}, vocab_size=v)
        with pytest.raises(ValueError, match="needs vocab_size"):
            fill(teacher, data, tmp_path / "d")
    finally:
        teacher.close()
    assert server.requests == 0  # refused before anything was asked


def test_the_next_batch_is_asked_for_while_this_one_is_stored(server, model, data, tmp_path):
    """The writer hands the server the next batch before it takes this one's answer, and
    each batch is asked for once (the prefetched answers are the ones used)."""
    teacher = ServedTeacher(server.url, NAME, top_k=K)
    calls: list[tuple[str, list[int]]] = []
    for name in ("prefetch", "signal"):
        method = getattr(teacher, name)

        def record(batch, method=method, name=name):
            calls.append((name, batch["index"].tolist()))
            return method(batch)

        setattr(teacher, name, record)
    try:
        write_cache(teacher, data, tmp_path / "c", unit="token", k=K, encoding=EXACT,
                    shard_size=7, batch_size=2, vocab_size=model.config.vocab_size,
                    progress=False)  # fmt: skip
    finally:
        teacher.close()
    b = [[0, 1], [2, 3], [4, 5], [6]]
    assert calls == [("prefetch", b[1]), ("signal", b[0]), ("prefetch", b[2]),
                     ("signal", b[1]), ("prefetch", b[3]), ("signal", b[2]),
                     ("signal", b[3])]  # fmt: skip
    assert server.requests == 4  # one request per batch: the prefetched answers were used


# --- recipes and the command line -----------------------------------------------------------


def test_a_recipe_fills_its_cache_from_the_server_and_trains_as_from_the_local_cache(
    llama_dir,
    tmp_path,
    tmp_path_factory,
    monkeypatch,
):
    """``potstill cache RECIPE --teacher-server URL`` in two parts loads no teacher weights;
    the recipe with teacher.server and that teacher.cache trains from it without asking the
    server again, with the losses and weights of the same recipe trained from the local
    teacher's exact cache."""
    import yaml
    from safetensors.torch import load_file
    from test_llm_pipeline import small_fortunes
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from potstill import hf
    from potstill.cli import app
    from potstill.runs import lm_data
    from potstill.runs import run as run_recipe

    fortunes = small_fortunes.__wrapped__(tmp_path_factory)
    variants = {"fkl": [{"kind": "fkl"}]}
    exact = {"k": K, "logprobs": "float32", "compression": "none"}
    cache = {**exact, "path": str(tmp_path / "cache")}
    path = tmp_path / "recipe.yaml"
    recipe = _recipe(llama_dir, fortunes, variants, cache=cache)
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_unset=True)))
    runner = CliRunner()
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir)
    with FakeServer(teacher, str(llama_dir)) as server:
        with monkeypatch.context() as m:

            def no_weights(*a, **kw):
                raise AssertionError("the teacher's weights were loaded")

            m.setattr(lm_data, "load_model", no_weights)
            m.setattr(hf, "load_model", no_weights)
            for shard in ("0/2", "1/2"):
                r = runner.invoke(app, ["cache", str(path), "--teacher-server", server.url,
                                        "--shard", shard])  # fmt: skip
                assert r.exit_code == 0, r.output
        assert "0 missing" not in r.output and "missing shards" not in r.output, r.output
        asked = server.requests
        assert asked > 0
        served_recipe = _recipe(llama_dir, fortunes, variants, cache=cache,
                                server={"url": server.url, "top_k": K})  # fmt: skip
        got = run_recipe(served_recipe, tmp_path / "served")
        assert server.requests == asked  # the cache was complete: nothing asked again
    assert got["teacher_cache"]["filled_by"] == f"server {server.url}/v1"
    run_recipe(_recipe(llama_dir, fortunes, variants, cache=exact), tmp_path / "local")
    rows = [[json.loads(x) for x in (tmp_path / run / "fkl" / "metrics.jsonl").read_text()
             .splitlines()] for run in ("served", "local")]  # fmt: skip
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-4)
    a, b = (load_file(tmp_path / run / "fkl" / "export" / "model.safetensors")
            for run in ("served", "local"))  # fmt: skip
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_the_command_line_fills_a_cache_from_the_server_without_a_recipe(
    llama_dir,
    tmp_path,
):
    """``potstill cache --teacher DIR --data F --teacher-server URL`` gives the cache the local
    teacher fills with the same options (to float32 rounding); a server that is not there is
    one line naming it."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from potstill.cli import app

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Fortune {i}.", "response": "Love conquers all." * (1 + i % 2)}
            for i in range(5)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["cache", "--teacher", str(llama_dir), "--data", str(data), "--k", str(K),
              "--logprobs", "float32", "--compression", "none", "--format", "text"]  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert r.exit_code == 0, r.output
    with FakeServer(AutoModelForCausalLM.from_pretrained(llama_dir), "teacher") as server:
        r = runner.invoke(app, [*common, "--out", str(tmp_path / "served"), "--teacher-server",
                                server.url, "--served-name", "teacher"])  # fmt: skip
        assert r.exit_code == 0, r.output
    with open(tmp_path / "local" / "manifest.json") as f:
        assert (
            json.load(f)["meaning"]["vocab_size"]
            == json.loads((tmp_path / "served" / "manifest.json").read_text())["meaning"][
                "vocab_size"
            ]
        )
    local, served = CachedTeacher(tmp_path / "local"), CachedTeacher(tmp_path / "served")
    for i in range(len(rows)):
        a, b = local[i], served[i]
        assert torch.equal(a["ids"], b["ids"])
        torch.testing.assert_close(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-5)
    r = runner.invoke(app, [*common, "--out", str(tmp_path / "gone"), "--teacher-server",
                            server.url])  # fmt: skip
    assert r.exit_code == 2 and f"{server.url}/v1: cannot connect" in r.output


def test_prompt_data_needs_the_local_teacher_to_answer_it_first(llama_dir, tmp_path):
    """A cache filled from the server alone loads no teacher, so prompt data (which the teacher
    must answer first) is refused with what to do, before anything is asked."""
    from test_llm_pipeline import recipe_dict

    from potstill.recipe.causal_lm import LMRecipe
    from potstill.runs.lm_data import cache_lm_recipe

    with FakeServer(torch.nn.Linear(1, 1), str(llama_dir)) as server:
        spec = recipe_dict(llama_dir, data={"name": "instructions", "train": 4, "val": 2})
        spec["teacher"]["server"] = {"url": server.url, "top_k": K}
        recipe = LMRecipe.model_validate(spec)
        with pytest.raises(ValueError, match="a server gives log-probabilities, not answers"):
            cache_lm_recipe(recipe, tmp_path / "cache", progress=False)
        assert server.requests == 0
