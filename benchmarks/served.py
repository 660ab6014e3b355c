"""A served teacher against a local one and a cache, measured in one sitting: the same token-level
distillation step (SmolLM2-135M-Instruct teacher, 10-layer student derived from it, forward KL,
batches of 4 fortunes of up to 64 tokens, AdamW) with the teacher (a) run live in the training
process, (b) read from a top-k cache filled before (not timed), (c) served by vLLM's CPU build on
127.0.0.1 (``.venv-vllm``, see ``make test-vllm``), all at k = 20.

Reported: tokens/s of each (real tokens per step over the median step time, after a warm-up
step) and, for the served teacher, the client's own work (building the request, HTTP, decoding
the JSON answer into the signal) as a share of the step: the served run goes through a small
recording proxy, and the same training run again against a server that replays vLLM's recorded
answers at once; the time that run waits for its teacher is the client's own. The server and the
training share this machine's cores, so the served row measures the protocol, not a separate
teacher machine.

    .venv/bin/python benchmarks/served.py            # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NAME = "smollm2"


class Recorder:
    """A proxy to ``upstream`` that keeps each answer by its request body (``record``), or
    answers the kept one at once (``replay``)."""

    def __init__(self, upstream: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.upstream, self.mode, self.kept = upstream, "record", {}
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._reply(urllib.request.urlopen(rec.upstream + self.path).read())

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if rec.mode == "replay":
                    self._reply(rec.kept[body])
                    return
                headers = {"Content-Type": "application/json"}
                req = urllib.request.Request(rec.upstream + self.path, data=body, headers=headers)
                rec.kept[body] = data = urllib.request.urlopen(req).read()
                self._reply(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per source")
    p.add_argument("--threads", type=int, default=1, help="training threads")
    p.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "served.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill import assets
    from potstill.cache import CachedTeacher, write_cache
    from potstill.config import TrainConfig
    from potstill.distiller import Distiller
    from potstill.llm.data import fortune_examples, tokenize_examples
    from potstill.llm.forward import causal_lm_forward
    from potstill.losses.objective import Objective
    from potstill.recipe.causal_lm import LMVariantSpec
    from potstill.served import ServedTeacher
    from potstill.students import derive
    from potstill.teachers import LiveTeacher

    folder = assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    n = 4 * (a.steps + 1)
    data = tokenize_examples(fortune_examples(None)[:n], tok, 64, fmt="chat")
    tokens_per_step = [int(data.tensors["attention_mask"][i : i + 4].sum()) for i in range(0, n, 4)]
    spec = LMVariantSpec.model_validate({"terms": [{"kind": "fkl"}]})
    work = Path(tempfile.mkdtemp(prefix="potstill-served-"))

    def train(source) -> list[float]:
        student = derive(teacher, keep=10).train()
        times: list[float] = []
        t = [time.perf_counter()]

        def tick(step: int, row: dict) -> None:
            now = time.perf_counter()
            times.append(now - t[0])
            t[0] = now

        cfg = TrainConfig(max_steps=a.steps + 1, batch_size=4, shuffle=False, progress=False,
                          tensorboard=False, report_to="none", clip_grad_norm=1.0,
                          optimizer={"name": "adamw", "lr": 1e-5})  # fmt: skip
        Distiller(student, Objective([t.build(chunk_size=64) for t in spec.terms]), data,
                  teacher=source, config=cfg, student_forward=causal_lm_forward,
                  callbacks=[tick]).fit()  # fmt: skip
        return times  # (the first step warms up: left out of the medians)

    results: dict = {"steps": a.steps, "threads": a.threads, "k": 20,
                     "tokens_per_step": statistics.median(tokens_per_step[1:])}  # fmt: skip
    live = train(LiveTeacher(teacher, forward=causal_lm_forward))
    write_cache(teacher, data, work / "cache", unit="token", k=20, forward=causal_lm_forward,
                tokenizer=tok, progress=False)  # fmt: skip
    cached = train(CachedTeacher(work / "cache"))
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_server import serve_vllm

    with serve_vllm(a.python, folder, work / "vllm.log", name=NAME, max_logprobs=20) as url:
        proxy = Recorder(url)
        served_teacher = ServedTeacher(proxy.url, NAME, top_k=20)
        served_teacher.check()
        served_teacher.rows([[1, 2, 3]])  # the server's first request warms it up
        served_teacher.wait_s = 0.0
        served = train(served_teacher)
    proxy.mode = "replay"  # the same requests, answered at once: what is left is the client's
    replayed_teacher = ServedTeacher(proxy.url, NAME, top_k=20)
    replayed = train(replayed_teacher)
    tps = results["tokens_per_step"]
    for name, times in (("live", live), ("cached", cached), ("served", served)):
        step = statistics.median(times[1:])
        results[name] = {"step_s": step, "tokens_per_s": tps / step, "steps_s": times}
    total = sum(served)  # every step, the warm-up one too, as the waits are
    results["served"].update(
        wait_s=served_teacher.wait_s, client_s=replayed_teacher.wait_s,
        client_share_of_step=replayed_teacher.wait_s / total, requests=served_teacher.requests,
        replayed_steps_s=replayed,
    )  # fmt: skip
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1))
    for name in ("live", "cached", "served"):
        r = results[name]
        print(f"{name:7s} {r['tokens_per_s']:8.1f} tokens/s  ({r['step_s']:.2f} s/step)")
    s = results["served"]
    print(
        f"served: waited {s['wait_s']:.2f} s for the teacher over {len(s['steps_s'])} steps, "
        f"the client's own work {s['client_s']:.3f} s: {100 * s['client_share_of_step']:.1f} % "
        "of the step"
    )


if __name__ == "__main__":
    main()
