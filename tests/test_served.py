"""The served teacher (potstill.served) against a small OpenAI-compatible server in vLLM's
answer format over a real model (tests/fake_server.py): the signal equals the live teacher's
top-k (ids exact, log-probabilities and tail to float32 rounding) at every real position of a
padded batch, every divergence kind gives the live top-k loss, and each way a server can fail
is one clear error naming the URL and what came back."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from test_llm_pipeline import tiny_llama

pytest.importorskip("openai")
from fake_server import FakeServer  # noqa: E402

from potstill.data.tensors import make_batch  # noqa: E402
from potstill.llm.data import LMExample, tokenize_examples  # noqa: E402
from potstill.llm.forward import causal_lm_forward  # noqa: E402
from potstill.losses.tokens import batch_token_mask, token_divergence  # noqa: E402
from potstill.served import ServedTeacher, ServerError, base_url  # noqa: E402
from potstill.signal import TopK  # noqa: E402
from potstill.teachers import LiveTeacher  # noqa: E402

NAME = "tiny-teacher"
K = 8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(len(tok), seed=1)
    with torch.no_grad():
        m.model.norm.weight.mul_(8)  # peaked, as a trained LM's distributions are
    return m.eval()


@pytest.fixture(scope="module")
def batch(tok):
    examples = [
        LMExample("Tell me a fortune.", "Never trust a computer you cannot lift."),
        LMExample("A fortune about love.", "Love conquers all."),
        LMExample("Say hi.", "Hi."),
    ]
    data = tokenize_examples(examples, tok, 40, fmt="text")
    b = make_batch(data, torch.arange(len(data)))
    lengths = b["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # padded rows of three lengths
    return b


@pytest.fixture
def server(model):
    with FakeServer(model, NAME) as s:
        yield s


def served(server, **kw) -> ServedTeacher:
    kw.setdefault("top_k", K)
    return ServedTeacher(server.url, NAME, **kw)


def test_the_signal_is_the_live_teachers_top_k(server, model, batch):
    teacher = served(server, request_size=2)  # two requests for the three rows
    got = teacher.signal(batch).topk
    live = TopK.from_logits(LiveTeacher(model, forward=causal_lm_forward).signal(batch).logits, K)
    real = batch["attention_mask"].bool()
    assert got.ids.shape == live.ids.shape == (*real.shape, K)
    assert torch.equal(got.ids[real], live.ids[real])
    # float32 rounding: the server runs each sequence alone, the live teacher the padded batch
    torch.testing.assert_close(got.logprobs[real], live.logprobs[real], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.tail_mass[real], live.tail_mass[real], rtol=1e-4, atol=1e-6)
    assert server.requests == 2 and teacher.requests == 2
    # what was sent: the real token ids of each row, and the settings that fix the meaning
    sent = [ids for body in server.bodies for ids in body["prompt"]]
    assert sorted(sent) == sorted(batch["input_ids"][b][real[b]].tolist() for b in range(3))
    body = server.bodies[0]
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["top_k"] == -1
    assert body["logprobs"] == body["prompt_logprobs"] == K and body["max_tokens"] == 1


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"])
def test_every_divergence_gives_the_live_top_k_loss(server, model, batch, kind):
    signal = served(server).signal(batch)
    # the live teacher over each row alone, as the server computes it: the padded batch's other
    # float32 rounding would otherwise reach the loss (≈1e-5 relative for rkl at T = 2)
    real = batch["attention_mask"].bool()
    logits = LiveTeacher(model, forward=causal_lm_forward).signal(batch).logits.clone()
    with torch.no_grad():
        for b in range(len(real)):
            logits[b][real[b]] = model(input_ids=batch["input_ids"][b][real[b]][None]).logits[0]
    live = TopK.from_logits(logits, K)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(*batch["input_ids"].shape, model.config.vocab_size, generator=g)
    mask = batch_token_mask(batch)
    a = token_divergence(student, signal.topk, mask, kind, temperature=2.0)
    b = token_divergence(student, live, mask, kind, temperature=2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-7)


def test_unknown_model_names_those_served(server):
    with pytest.raises(ServerError, match=rf"{server.url}/v1 does not serve 'other'.*"
                                          rf"\['{NAME}'\]"):  # fmt: skip
        ServedTeacher(server.url, "other").check()
    served(server).check()  # the right name passes


def test_a_model_the_server_lacks_is_named_at_the_first_request(server, batch):
    with pytest.raises(ServerError, match=r"HTTP 404: .*`other` does not exist"):
        ServedTeacher(server.url, "other", top_k=K).signal(batch)


def test_5xx_answers_are_retried_then_named(server, batch):
    server.failures = 2
    served(server, retries=3).signal(batch)  # two 503s, then the answer
    assert server.requests == 3
    server.failures = 10
    with pytest.raises(ServerError, match=r"HTTP 503: .*overloaded"):
        served(server, retries=1).signal(batch)


def test_a_slow_server_is_a_timeout_naming_the_setting(server, batch):
    server.mode = "slow"
    with pytest.raises(ServerError, match=r"no answer to POST /completions within 1 s .*"
                                          r"teacher.server.timeout"):  # fmt: skip
        served(server, timeout=1.0, retries=0).signal(batch)


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("short", "answered 7 prompt positions for the 8 tokens sent"),
        ("echo", "echoed other tokens than were sent"),
        ("narrow", f"fewer than top_k = {K}; start it with --max-logprobs {K}"),
        ("logits", "not log-probabilities .*--logprobs-mode raw_logprobs"),
    ],
)
def test_answers_that_are_not_what_was_asked_are_named(server, tok, mode, says):
    server.mode = mode
    ids = tok("A fortune about love, or two.")["input_ids"]
    assert len(ids) == 8
    with pytest.raises(ServerError, match=says) as e:
        served(server).rows([ids])
    assert server.url in str(e.value)


def test_malformed_json_is_an_error_naming_the_server(server, batch):
    server.mode = "malformed"
    with pytest.raises(ServerError, match=rf"{server.url}/v1: POST /completions answered "
                                          "something that is not JSON"):  # fmt: skip
        served(server, retries=0).signal(batch)


def test_no_server_at_the_address(batch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and nothing listens once closed
    with pytest.raises(ServerError, match=rf"127.0.0.1:{port}/v1: cannot connect .*running"):
        ServedTeacher(f"http://127.0.0.1:{port}", NAME, retries=0, timeout=5).signal(batch)


def test_the_api_key_comes_from_the_environment_and_is_never_shown(model, batch, monkeypatch):
    secret = "sk-test-0123456789"
    with FakeServer(model, NAME, api_key=secret) as server:
        with pytest.raises(ServerError, match="HTTP 401.*api_key_env") as e:
            served(server).signal(batch)
        assert secret not in str(e.value)
        with pytest.raises(ValueError, match="POTSTILL_TEST_KEY is not set"):
            served(server, api_key_env="POTSTILL_TEST_KEY")
        monkeypatch.setenv("POTSTILL_TEST_KEY", secret)
        teacher = served(server, api_key_env="POTSTILL_TEST_KEY")
        assert teacher.signal(batch).topk.k == K
        assert secret not in repr(teacher)


def test_settings_are_checked():
    assert base_url("http://h:8000") == base_url("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ValueError, match="must start with http"):
        base_url("h:8000")
    with pytest.raises(ValueError, match="teacher.server.top_k must be at least 1"):
        ServedTeacher("http://h:1", NAME, top_k=0)


# --- a causal-LM recipe trained from the server ---------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(model, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


ON_POLICY = {"terms": [{"kind": "fkl"}], "on_policy": 1.0, "sampling": {"max_new_tokens": 3}}


def _recipe(llama_dir, fortunes, variants, **teacher):
    from test_llm_pipeline import recipe_dict

    from potstill.recipe.causal_lm import LMRecipe

    data = recipe_dict(
        llama_dir, data={"folder": str(fortunes), "train": 6, "val": 2}, variants=variants,
        train={"max_steps": 2, "batch_size": 3, "optimizer": {"name": "sgd", "lr": 0.05}},
        generate={"prompts": ["A fortune about love."], "max_new_tokens": 2},
    )  # fmt: skip
    data["teacher"].update(teacher)
    return LMRecipe.model_validate(data)


def test_a_recipe_trains_from_the_server_as_from_an_exact_cache(
    llama_dir, tmp_path, tmp_path_factory
):
    """The same recipe with its teacher served (top 8) and cached exactly (top 8, float32,
    uncompressed): the same losses and weights within float32 rounding; an on-policy variant
    trains from the server's scores of the student's own samples; the server's figures land
    in the results."""
    from safetensors.torch import load_file
    from test_llm_pipeline import small_fortunes
    from transformers import AutoModelForCausalLM

    from potstill.runs import run as run_recipe

    fortunes = small_fortunes.__wrapped__(tmp_path_factory)
    with FakeServer(AutoModelForCausalLM.from_pretrained(llama_dir), str(llama_dir)) as server:
        variants = {"fkl": [{"kind": "fkl"}], "on-policy": ON_POLICY}
        recipe = _recipe(llama_dir, fortunes, variants, server={"url": server.url, "top_k": K})
        got = run_recipe(recipe, tmp_path / "served")
        sent = [len(ids) for body in server.bodies for ids in body["prompt"]]
    exact = {"k": K, "logprobs": "float32", "compression": "none"}
    run_recipe(_recipe(llama_dir, fortunes, {"fkl": [{"kind": "fkl"}]}, cache=exact),
               tmp_path / "cached")  # fmt: skip
    assert got["teacher_server"]["url"] == f"{server.url}/v1"
    assert got["teacher_server"]["top_k"] == K and got["teacher_server"]["requests"] > 0
    # the on-policy variant's batches are the student's samples, which the server scored too
    on_policy = [json.loads(x) for x in (tmp_path / "served" / "on-policy" / "metrics.jsonl")
                 .read_text().splitlines()]  # fmt: skip
    assert all(r["loss"] > 0 for r in on_policy if "loss" in r)
    assert len(sent) > 2 * 3  # more sequences than the fkl variant's two steps of three
    for name in ("fkl",):
        rows = [[json.loads(x) for x in (tmp_path / run / name / "metrics.jsonl").read_text()
                 .splitlines()] for run in ("served", "cached")]  # fmt: skip
        losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
        assert losses[0] and losses[0] == pytest.approx(losses[1], rel=1e-4), name
        a, b = (load_file(tmp_path / run / name / "export" / "model.safetensors")
                for run in ("served", "cached"))  # fmt: skip
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_the_command_line_takes_the_server_and_names_a_missing_one(llama_dir, tmp_path,
                                                                   tmp_path_factory):  # fmt: skip
    import yaml
    from test_llm_pipeline import small_fortunes
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from potstill.cli import app

    fortunes = small_fortunes.__wrapped__(tmp_path_factory)
    recipe = _recipe(llama_dir, fortunes, {"fkl": [{"kind": "fkl"}]})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json", exclude_unset=True)))
    runner = CliRunner()
    with FakeServer(AutoModelForCausalLM.from_pretrained(llama_dir), str(llama_dir)) as server:
        r = runner.invoke(app, ["distill", str(path), "--out", str(tmp_path / "run"),
                                "--teacher-server", server.url])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert server.requests > 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["teacher_server"]["url"] == f"{server.url}/v1"
    # the server gone: one line naming it, exit 2
    r = runner.invoke(app, ["distill", str(path), "--out", str(tmp_path / "again"),
                            "--teacher-server", server.url])  # fmt: skip
    assert r.exit_code == 2 and f"{server.url}/v1: cannot connect" in r.output


def test_recipe_settings_of_the_server_are_checked(llama_dir, tmp_path):
    from pydantic import ValidationError

    base = {"fkl": [{"kind": "fkl"}]}
    # server and cache: the cache is filled from the server, k its top_k unless given
    both = _recipe(llama_dir, tmp_path, base, server={"url": "http://h:8000", "top_k": 12},
                   cache=True)  # fmt: skip
    assert both.teacher.cache.k == 12
    with pytest.raises(ValidationError, match=r"teacher.cache.k = 16 is more than .*top_k = 12"):
        _recipe(llama_dir, tmp_path, base, server={"url": "http://h:8000", "top_k": 12},
                cache={"k": 16})  # fmt: skip
    with pytest.raises(ValidationError, match="must start with http"):
        _recipe(llama_dir, tmp_path, base, server={"url": "h:8000"})
    with pytest.raises(ValidationError, match="top_k"):
        _recipe(llama_dir, tmp_path, base, server={"url": "http://h:8000", "top_k": 0})


def test_a_transformers_trainer_trains_from_the_server_as_the_distiller_does(
    server, tok, tmp_path, no_fake_accelerator
):
    """The served teacher as the source of potstill's DistillationTrainer: the same losses at
    the same steps and the same weights as the Distiller trained from the same server."""
    pytest.importorskip("transformers")
    from test_trainer_integration import InOrder
    from transformers import TrainingArguments

    from potstill.config import TrainConfig
    from potstill.data.tensors import TensorDictDataset
    from potstill.distiller import Distiller
    from potstill.losses.objective import Objective
    from potstill.recipe.causal_lm import LMVariantSpec

    examples = [LMExample(f"Fortune {i}.", "Never trust a computer." * (1 + i % 3))
                for i in range(12)]  # fmt: skip
    data = tokenize_examples(examples, tok, 24, fmt="text")
    data = TensorDictDataset({**data.tensors, "index": torch.arange(len(data))})
    spec = LMVariantSpec.model_validate({"terms": [{"kind": "fkl"}]})

    def objective() -> Objective:
        return Objective([t.build(chunk_size=16) for t in spec.terms])

    steps, lr = 3, 1e-3
    ours = Distiller(
        tiny_llama(len(tok), seed=2).train(), objective(), data, teacher=served(server),
        student_forward=causal_lm_forward,
        config=TrainConfig(max_steps=steps, batch_size=4, shuffle=False, log_every=1,
                           progress=False, report_to="none", clip_grad_norm=None,
                           optimizer={"lr": lr, "fused": False, "weight_decay": 0.0},
                           schedule={"name": "constant"}),
    ).fit()  # fmt: skip
    trainer = InOrder(
        model=tiny_llama(len(tok), seed=2).train(), train_dataset=data, teacher=served(server),
        objective=objective(), student_forward=causal_lm_forward,
        args=TrainingArguments(
            output_dir=str(tmp_path / "t"), max_steps=steps, per_device_train_batch_size=4,
            learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
            logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
            optim="adamw_torch", disable_tqdm=True,
        ),
    )  # fmt: skip
    trainer.train()
    logged = [r for r in trainer.state.log_history if "fkl" in r]
    assert [r["step"] for r in logged] == [r["step"] for r in ours.history] == [1, 2, 3]
    for theirs, mine in zip(logged, ours.history, strict=True):
        assert theirs["fkl"] == pytest.approx(mine["fkl"], rel=1e-4)
    mine = ours.student.state_dict()
    for name, w in trainer.model.state_dict().items():
        torch.testing.assert_close(w, mine[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_next_steps_teacher_answers_are_asked_for_while_this_step_trains(server, tok):
    """The Distiller hands a served teacher the next step's batch before it trains this one:
    each step's request reaches the server before the step before it ends, one request per
    step (none twice), and the run is the same as without prefetching, loss for loss."""
    import time

    from potstill.config import TrainConfig
    from potstill.distiller import Distiller
    from potstill.losses.objective import Objective
    from potstill.recipe.causal_lm import LMVariantSpec

    examples = [LMExample(f"Fortune {i}.", "Never trust a computer." * (1 + i % 3))
                for i in range(8)]  # fmt: skip
    data = tokenize_examples(examples, tok, 24, fmt="text")
    spec = LMVariantSpec.model_validate({"terms": [{"kind": "fkl"}]})

    class NoPrefetch:  # the same server, asked only when the step needs it
        def __init__(self, teacher):
            self.signal = teacher.signal

    def fit(teacher) -> tuple[list[float], list[float]]:
        ends: list[float] = []
        result = Distiller(
            tiny_llama(len(tok), seed=2).train(),
            Objective([t.build(chunk_size=16) for t in spec.terms]), data, teacher=teacher,
            student_forward=causal_lm_forward, callbacks=[lambda s, r: ends.append(
                time.perf_counter())],
            config=TrainConfig(max_steps=4, batch_size=2, shuffle=False, log_every=1,
                               progress=False, report_to="none"),
        ).fit()  # fmt: skip
        return [r["loss"] for r in result.history], ends

    server.delay = 0.3
    plain, _ = fit(NoPrefetch(served(server)))
    assert server.requests == 4
    server.arrivals.clear()
    ahead, ends = fit(served(server))
    assert server.requests == 8  # 4 more: each batch asked for once
    # step s + 1's request arrived before step s ended (the first two together, at the start)
    assert all(server.arrivals[s + 1] < ends[s] for s in range(3)), (server.arrivals, ends)
    assert ahead == plain


def test_a_chain_refuses_a_served_teacher_it_would_not_use(llama_dir, tmp_path):
    """A chain's stages train from their assistants: a served teacher given to it is refused,
    not silently ignored (--teacher-server on a chain sets base.teacher.server)."""
    from pydantic import ValidationError

    from potstill.recipe.chain import ChainRecipe

    base = _recipe(llama_dir, tmp_path, {"fkl": [{"kind": "fkl"}]}).model_dump(
        mode="json", exclude_unset=True)  # fmt: skip
    base["teacher"]["server"] = {"url": "http://h:8000"}
    with pytest.raises(ValidationError, match="base.teacher.server: a chain's stages"):
        stages = [{"name": "s", "set": {"student": {"keep": 1}}}]
        ChainRecipe.model_validate({"kind": "chain", "name": "c", "base": base, "stages": stages})
