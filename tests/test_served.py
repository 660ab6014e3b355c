"""The served teacher (potstill.served) against a small OpenAI-compatible server in vLLM's
answer format over a real model (tests/fake_server.py): the signal equals the live teacher's
top-k (ids exact, log-probabilities and tail to float32 rounding) at every real position of a
padded batch, every divergence kind gives the live top-k loss, and each way a server can fail
is one clear error naming the URL and what came back."""

from __future__ import annotations

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
    live = TopK.from_logits(LiveTeacher(model, forward=causal_lm_forward).signal(batch).logits, K)
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
