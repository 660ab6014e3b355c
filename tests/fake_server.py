"""A small OpenAI-compatible completions server in vLLM's answer format, over a real Hugging
Face causal LM, for the served-teacher tests: it answers ``prompt_logprobs`` (top-k of each
prompt position) and the generated token's ``top_logprobs`` from the model's own logits, echoes
``prompt_token_ids``, serves ``GET /v1/models``, and can be told to misbehave (``mode``): slow
answers, 5xx, malformed or short answers, other tokens echoed, logits in place of
log-probabilities, a refused key."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class FakeServer:
    """``with FakeServer(model, "name") as s: s.url``; ``s.mode`` / ``s.failures`` change its
    behaviour; ``s.requests`` counts completions requests, ``s.bodies`` keeps them."""

    def __init__(self, model: torch.nn.Module, name: str, *, api_key: str | None = None):
        self.model, self.name, self.api_key = model.eval(), name, api_key
        self.mode = "ok"
        self.delay = 0.0  # seconds before each completions answer
        self.arrivals: list[float] = []  # when each completions request arrived (perf_counter)
        self.failures = 0  # the next N completions requests answer HTTP 503
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key is None:
                    return True
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return True
                self._send(401, {"error": {"message": "invalid API key", "code": 401}})
                return False

            def do_GET(self) -> None:  # noqa: N802
                if not self._authorised():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": server.name, "object": "model", "owned_by": "test"}]})  # fmt: skip
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.arrivals.append(time.perf_counter())
                    server.requests += 1
                    server.bodies.append(body)
                    failing = server.failures > 0
                    server.failures -= failing
                if failing:
                    self._send(503, {"error": {"message": "overloaded"}})
                    return
                if body.get("model") != server.name:
                    missing = f"The model `{body.get('model')}` does not exist."
                    self._send(404, {"error": {"message": missing, "code": 404}})
                    return
                if server.mode == "slow":
                    time.sleep(3)
                time.sleep(server.delay)
                if server.mode == "malformed":
                    self._send(200, "{not json")
                    return
                self._send(200, server.answer(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        prompts = body["prompt"]
        k, k_prompt = body["logprobs"], body["prompt_logprobs"]
        choices = []
        for i, ids in enumerate(prompts):
            logits = self.model(torch.tensor([ids])).logits[0].float()  # as vLLM: float32
            values = logits if self.mode == "logits" else logits.log_softmax(-1)
            prompt_lp: list[dict[str, Any] | None] = [None]
            for t in range(1, len(ids)):  # the distribution of token t, given those before it
                top = values[t - 1].topk(k_prompt)
                pairs = enumerate(zip(top.values, top.indices, strict=True))
                entry = {str(int(j)): {"logprob": float(v), "rank": r + 1} for r, (v, j) in pairs}
                actual = ids[t]  # vLLM adds the prompt's own token when outside the top-k
                if str(actual) not in entry:
                    rank = int((values[t - 1] > values[t - 1, actual]).sum()) + 1
                    entry[str(actual)] = {"logprob": float(values[t - 1, actual]), "rank": rank}
                prompt_lp.append(entry)
            top = values[-1].topk(k)
            generated = {f"token_id:{int(j)}": float(v)
                         for v, j in zip(top.values, top.indices, strict=True)}  # fmt: skip
            echoed = list(ids)
            if self.mode == "short":
                prompt_lp = prompt_lp[:-1]
            if self.mode == "echo":
                echoed = [1, *echoed]  # a BOS the server added
            if self.mode == "narrow":
                prompt_lp = [None] + [dict(list(e.items())[: k_prompt - 1]) for e in prompt_lp[1:]]
            choices.append({
                "index": i, "text": "", "finish_reason": "length",
                "logprobs": {"text_offset": [0], "token_logprobs": [None], "tokens": ["x"],
                             "top_logprobs": [generated]},
                "prompt_logprobs": prompt_lp, "prompt_token_ids": echoed,
            })  # fmt: skip
        return {
            "id": "cmpl-test", "object": "text_completion", "created": 0, "model": self.name,
            "choices": choices,
            "usage": {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": len(prompts),
                      "total_tokens": sum(map(len, prompts)) + len(prompts)},
        }  # fmt: skip
