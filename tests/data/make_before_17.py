"""Writes tests/data/before-17: teacher caches and an interrupted run's checkpoint made by potstill
as it was before issue 17 rebuilt its rooms (commit 4089819), which tests/test_compat.py reads
back with today's code. It imports that commit's modules, so run it only against it:

    git worktree add /tmp/old 4089819
    PYTHONPATH=/tmp/old/src python tests/data/make_before_17.py tests/data/before-17
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

from potstill import LiveTeacher
from potstill.cache import CachedTeacher, Encoding, build_logit_cache, write_cache
from potstill.config import TrainConfig
from potstill.data import TensorDictDataset
from potstill.distiller import Distiller
from potstill.losses.objective import hinton_objective


class Stop(Exception):
    pass


def save(tensors: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def lm_forward(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"])


def student() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))


def loss_values() -> dict[str, torch.Tensor]:
    """Every term's value and student gradient on fixed inputs, as the code of that time gave
    them: kd, ce, each divergence per row and per token (dense, chunked, top-k, fused head)."""
    from potstill.losses.causal import next_token_ce_term, token_term
    from potstill.losses.llm import TopK

    from potstill.losses.objective import ce_term, divergence_term, kd_term
    from potstill.signal import Signal, StudentView

    g = torch.Generator().manual_seed(7)
    rows_s, rows_t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g)
    labels = torch.tensor([1, -100, 3, 4, -100, 0])
    B, T, V, H = 2, 5, 13, 4
    hidden, head = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    tok_t = torch.randn(B, T, V, generator=g)
    batch = {
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "prompt_length": torch.tensor([1, 2]),
        "label": labels,
        "index": torch.arange(B),
    }
    out: dict[str, torch.Tensor] = {}

    def record(name, term, student, signal, deferred=False):
        x = student.clone().requires_grad_()
        if deferred:
            view = StudentView(hidden=x, head=nn.Linear(H, V, bias=False))
            view.head.weight.data.copy_(head)
        else:
            view = StudentView(logits=x)
        value = term.fn(view, signal, batch if x.dim() == 3 else {"label": labels})
        value.backward()
        out[f"{name}.value"], out[f"{name}.grad"] = value.detach(), x.grad

    kinds = ["fkl", "rkl", "jsd", "tvd", "mse", "skl", "srkl"]
    record("kd", kd_term(2.0, 1.0), rows_s, Signal(logits=rows_t))
    record("ce", ce_term(1.0, label_smoothing=0.1), rows_s, None)
    record("ce.token", next_token_ce_term(), tok_t * 0.5, None)
    topk = TopK.from_logits(tok_t, 4)
    for kind in kinds:
        opts = {"temperature": 1.5, "beta": 0.3, "skew": 0.2}
        record(f"row.{kind}", divergence_term(kind, **opts), rows_s, Signal(logits=rows_t))
        for chunk in (None, 3):
            term = token_term(kind, chunk_size=chunk, **opts)
            record(f"token.{kind}.{chunk}", term, tok_t * 0.5, Signal(logits=tok_t))
            if kind != "mse":
                record(f"topk.{kind}.{chunk}", term, tok_t * 0.5, Signal(topk=topk))
        record(f"fused.{kind}", token_term(kind, chunk_size=3, **opts), hidden,
               Signal(logits=tok_t), deferred=True)  # fmt: skip
    return out


def main(out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # token caches of a tiny language model over 6 right-padded rows of 7 tokens
    V, T, N = 40, 7, 6
    ids = torch.randint(3, V, (N, T), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(T)[None] < torch.tensor([7, 5, 6, 3, 7, 4])[:, None]).long()
    ids = ids * mask
    torch.manual_seed(1)
    lm = nn.Sequential(nn.Embedding(V, 8), nn.Tanh(), nn.Linear(8, V))
    with torch.no_grad():
        lm[2].weight.mul_(4.0)
    data = TensorDictDataset({"input_ids": ids, "attention_mask": mask})
    save({"input_ids": ids, "attention_mask": mask}, out / "tokens.safetensors")
    save(lm.state_dict(), out / "lm.safetensors")
    expected = {}
    encodings = {
        "q8-zlib": Encoding(),
        "f32-none": Encoding(logprobs="float32", compression="none"),
    }
    for name, enc in encodings.items():
        path = out / f"cache-{name}"
        write_cache(lm, data, path, unit="token", k=8, encoding=enc, forward=lm_forward,
                    shard_size=4, batch_size=3, progress=False)  # fmt: skip
        topk = CachedTeacher(path, teacher=lm, dataset=data).signal(data.batch(torch.arange(N)))
        expected.update({f"{name}.ids": topk.topk.ids, f"{name}.logprobs": topk.topk.logprobs,
                         f"{name}.tail": topk.topk.tail_mass})  # fmt: skip
    # a classic cache: a classifier's dense logits, one row per example
    torch.manual_seed(2)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    clf = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    rows = TensorDataset(x, y)
    save({"x": x, "y": y}, out / "rows.safetensors")
    save(clf.state_dict(), out / "clf.safetensors")
    build_logit_cache(clf, rows, out / "cache-logits", batch_size=4, progress=False)
    cached = CachedTeacher(out / "cache-logits", teacher=clf, dataset=rows)
    expected["logits"] = cached.signal({"index": torch.arange(10)}).logits
    save(expected, out / "expected-signals.safetensors")
    # a 6-step run checkpointed every 3 steps: whole, and stopped after step 4
    save(student().state_dict(), out / "student-init.safetensors")
    cfg = TrainConfig(max_steps=6, batch_size=4, checkpoint_every=3, eval_every=3, log_every=1,
                      progress=False, tensorboard=False, seed=5)  # fmt: skip
    objective = hinton_objective(2.0, 0.5)
    whole = Distiller(student(), objective, rows, teacher=LiveTeacher(clf), config=cfg,
                      run_dir=out / "whole").fit()  # fmt: skip
    save(whole.student.state_dict(), out / "student-final.safetensors")
    shutil.rmtree(out / "whole")

    def stop(step: int, row: dict) -> None:
        if step == 4:
            raise Stop

    try:
        Distiller(student(), hinton_objective(2.0, 0.5), rows, teacher=LiveTeacher(clf),
                  config=cfg, run_dir=out / "interrupted", callbacks=[stop]).fit()  # fmt: skip
    except Stop:
        pass
    save(loss_values(), out / "loss-values.safetensors")
    info = {"made_by": "potstill at commit 4089819 (before issue 17)",
            "config": cfg.model_dump(mode="json")}  # fmt: skip
    (out / "README.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
