"""A served teacher: a causal LM's next-token distributions asked of an OpenAI-compatible server
(vLLM) and turned into the sparse :class:`~potstill.signal.Signal` a teacher cache gives (top-k
ids, log-probabilities, tail mass), so every token term trains from it unchanged.

What is sent is the batch's token ids, never text, so tokenization cannot drift; the server's
echo of them is checked. Per sequence of ``n`` real tokens the server answers, through vLLM's
completions extension, the top-k log-probabilities of each prompt position (``prompt_logprobs``:
the distribution of token ``t`` given those before it) and of one generated token (the
distribution after the last): row ``t`` of the signal is the distribution *after* token ``t``,
as a live teacher's logits at ``t`` are.

**Temperature.** The rows are the teacher's distribution at temperature 1 (as the cache stores
them); a term's own temperature re-tempers them. The request asks for temperature 1 with no
top-k/top-p truncation, so vLLM's raw and processed log-probabilities agree; values that are not
normalized log-probabilities (a server in a ``*_logits`` mode) are refused, naming the mode.

Requests go ``request_size`` sequences at a time, up to ``concurrency`` at once; the client
library (``openai``) retries timeouts, connection errors and 5xx answers with backoff. The API
key is read from the environment variable ``api_key_env`` and never logged or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .signal import Signal, TopK, place_rows

Batch = Mapping[str, Any]

_LOGPROB_SLACK = 1e-3  # rounding a server may add to a probability sum (float32, JSON)


class ServerError(RuntimeError):
    """A teacher server could not be reached, refused the request, or answered something other
    than what was asked; the message names the URL, what came back and what to do."""


def base_url(url: str) -> str:
    """``http://host:8000`` or ``…/v1`` as the client's base URL (ending in ``/v1``)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"teacher.server.url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/v1") else url + "/v1"


class ServedTeacher:
    """A teacher behind an OpenAI-compatible completions server (vLLM: ``vllm serve MODEL
    --max-logprobs K``), for causal-LM token distillation.

    ``url`` the server (``http://host:8000``); ``model`` the name it serves the teacher under;
    ``top_k`` the log-probabilities per position (at most the server's ``--max-logprobs``);
    ``api_key_env`` the environment variable holding the API key (none: no key);
    ``timeout`` seconds per request; ``retries`` per request on timeouts and 5xx;
    ``concurrency`` requests in flight; ``request_size`` sequences per request.

    >>> teacher = ServedTeacher("http://127.0.0.1:8000", "HuggingFaceTB/SmolLM2-135M-Instruct",
    ...                         top_k=20)                                 # doctest: +SKIP
    >>> teacher.signal(batch).topk.ids.shape                              # doctest: +SKIP
    torch.Size([8, 64, 20])
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        top_k: int = 20,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        concurrency: int = 4,
        request_size: int = 8,
    ) -> None:
        try:
            import openai
        except ImportError as e:
            raise ImportError(
                "a served teacher needs the openai client: pip install 'potstill[served]'"
            ) from e
        for name, value in (("top_k", top_k), ("concurrency", concurrency),
                            ("request_size", request_size)):  # fmt: skip
            if value < 1:
                raise ValueError(f"teacher.server.{name} must be at least 1, got {value}")
        if not timeout > 0:
            raise ValueError(f"teacher.server.timeout must be positive, got {timeout}")
        key = "EMPTY"  # what vLLM takes when it was started without --api-key
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(
                    f"teacher.server.api_key_env: the environment variable {api_key_env} is not "
                    "set; export it with the server's API key"
                )
        self.url = base_url(url)
        self.model = model
        self.k = top_k
        self.timeout = timeout
        self.retries = retries
        self.request_size = request_size
        self._openai = openai
        self._client = openai.OpenAI(
            base_url=self.url, api_key=key, timeout=timeout, max_retries=retries
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="potstill-served")
        # prefetches wait on the pool's requests from a thread of their own (never the pool's)
        self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="potstill-prefetch")
        self._pending: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.requests = 0
        self.wait_s = 0.0  # time signal() spent waiting for answers (HTTP and the server)

    def __repr__(self) -> str:  # the key stays out of every message
        return f"ServedTeacher({self.url!r}, {self.model!r}, top_k={self.k})"

    # ---- the server --------------------------------------------------------------------------

    def _call(self, what: str, fn: Any) -> Any:
        o = self._openai
        try:
            return fn()
        except o.APITimeoutError:
            raise ServerError(
                f"teacher server {self.url}: no answer to {what} within {self.timeout:g} s "
                f"({self.retries} retries); raise teacher.server.timeout or check the server"
            ) from None
        except o.APIConnectionError as e:
            raise ServerError(
                f"teacher server {self.url}: cannot connect ({e.__cause__ or e}); is the server "
                "running at that address?"
            ) from None
        except (ValueError, o.APIResponseValidationError) as e:  # (JSONDecodeError: a ValueError)
            raise ServerError(
                f"teacher server {self.url}: {what} answered something that is not JSON in the "
                f"completions format ({type(e).__name__}: {str(e)[:200]}); is it an "
                "OpenAI-compatible server?"
            ) from None
        except o.APIStatusError as e:
            body = (e.response.text if e.response is not None else str(e))[:500]
            hint = (
                "; set teacher.server.api_key_env to the variable holding its key"
                if e.status_code in (401, 403)
                else ""
            )
            raise ServerError(
                f"teacher server {self.url}: {what} answered HTTP {e.status_code}: {body}{hint}"
            ) from None

    def _listing(self) -> dict[str, dict[str, Any]]:
        listed = self._call("GET /models", self._client.models.list).data
        return {m.id: m.model_dump() for m in listed}

    def served_models(self) -> list[str]:
        """The model names the server serves."""
        return list(self._listing())

    def check(self) -> None:
        """Refuse a server that does not serve :attr:`model`, naming those it does."""
        self._entry()

    def _entry(self) -> dict[str, Any]:
        listing = self._listing()
        if self.model not in listing:
            raise ServerError(
                f"teacher server {self.url} does not serve {self.model!r} (it serves "
                f"{list(listing)}); set teacher.server.model to the name it serves"
            )
        return listing[self.model]

    def fingerprint(self) -> str:
        """What a cache filled from this server records in place of the weights' fingerprint:
        ``served:`` and the SHA-256 of the served name and its ``root`` (the weights vLLM was
        started with), not the URL, so the same model served from elsewhere keeps its caches."""
        entry = self._entry()
        key = json.dumps({"id": self.model, "root": entry.get("root")}, sort_keys=True)
        return "served:" + hashlib.sha256(key.encode()).hexdigest()

    # ---- distributions -----------------------------------------------------------------------

    def rows(self, sequences: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """Each sequence's rows: ``ids`` / ``logprobs`` ``(n, k)`` (descending) and ``tail``
        ``(n,)``, row ``t`` the distribution after token ``t``."""
        chunks = [
            [list(map(int, s)) for s in sequences[i : i + self.request_size]]
            for i in range(0, len(sequences), self.request_size)
        ]
        out: list[dict[str, torch.Tensor]] = []
        for answer in self._pool.map(self._request, chunks):
            out.extend(answer)
        return out

    def _request(self, chunk: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        if any(len(ids) == 0 for ids in chunk):
            raise ValueError("a served teacher needs at least one token per sequence")
        response = self._call(
            "POST /completions",
            lambda: self._client.completions.create(
                model=self.model, prompt=chunk, max_tokens=1, temperature=1.0, top_p=1.0,
                logprobs=self.k,
                extra_body={"prompt_logprobs": self.k, "top_k": -1, "return_token_ids": True,
                            "return_tokens_as_token_ids": True},
            ),
        )  # fmt: skip
        self.requests += 1
        choices = sorted((c.model_dump() for c in response.choices), key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(len(chunk))):
            raise ServerError(
                f"teacher server {self.url}: {len(chunk)} prompts sent, answers for indices "
                f"{[c['index'] for c in choices]}"
            )
        return [self._parse(c, ids) for c, ids in zip(choices, chunk, strict=True)]

    def _parse(self, choice: dict[str, Any], ids: list[int]) -> dict[str, torch.Tensor]:
        where = f"teacher server {self.url} ({self.model})"
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != ids:
            pairs = enumerate(zip(ids, echoed, strict=False))
            at = next((i for i, (a, b) in pairs if a != b),
                      min(len(ids), len(echoed)))  # fmt: skip
            raise ServerError(
                f"{where} echoed other tokens than were sent ({len(echoed)} for {len(ids)}; "
                f"first difference at position {at}): it changed the prompt (a BOS added, the "
                "ids decoded and encoded again); serve the same tokenizer and send no text"
            )
        prompt = choice.get("prompt_logprobs")
        if prompt is None:
            raise ServerError(
                f"{where} answered no prompt_logprobs: it is not vLLM, or too old to return "
                "them; a served teacher needs a vLLM-compatible server"
            )
        if len(prompt) != len(ids):
            raise ServerError(
                f"{where} answered {len(prompt)} prompt positions for the {len(ids)} tokens sent"
            )
        last = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
        if last is None:
            raise ServerError(f"{where} answered no log-probabilities for the generated token")
        tables = [self._prompt_table(prompt[t], t) for t in range(1, len(ids))]
        tables.append(self._generated_table(last))
        top_ids = torch.empty(len(ids), self.k, dtype=torch.long)
        top_lp = torch.empty(len(ids), self.k, dtype=torch.float32)
        for t, table in enumerate(tables):
            if len(table) < self.k:
                raise ServerError(
                    f"{where} answered {len(table)} log-probabilities at position {t}, fewer "
                    f"than top_k = {self.k}; start it with --max-logprobs {self.k} or more"
                )
            best = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))[: self.k]
            top_ids[t] = torch.tensor([i for i, _ in best])
            top_lp[t] = torch.tensor([v for _, v in best], dtype=torch.float64).float()
        mass = top_lp.double().exp().sum(-1)
        if bool((top_lp > _LOGPROB_SLACK).any()) or bool((mass > 1 + _LOGPROB_SLACK).any()):
            raise ServerError(
                f"{where} answered values that are not log-probabilities (largest "
                f"{float(top_lp.max()):.3g}, probability sum up to {float(mass.max()):.4g}): "
                "start vLLM with --logprobs-mode raw_logprobs (the default)"
            )
        tail = (1.0 - mass).clamp_min(0.0).float()
        return {"ids": top_ids, "logprobs": top_lp, "tail": tail}

    def _prompt_table(self, entry: Any, t: int) -> dict[int, float]:
        if not isinstance(entry, Mapping):
            raise ServerError(
                f"teacher server {self.url}: prompt_logprobs[{t + 1}] is {entry!r}, not a table"
            )
        try:
            return {int(i): float(v["logprob"]) for i, v in entry.items()}
        except (KeyError, TypeError, ValueError):
            raise ServerError(
                f"teacher server {self.url}: prompt_logprobs[{t + 1}] is malformed: "
                f"{str(entry)[:200]}"
            ) from None

    def _generated_table(self, entry: Any) -> dict[int, float]:
        try:
            return {int(str(tok).removeprefix("token_id:")): float(v) for tok, v in entry.items()}
        except (AttributeError, TypeError, ValueError):
            raise ServerError(
                f"teacher server {self.url}: the generated token's log-probabilities are not "
                f"keyed by token id ({str(entry)[:200]}); a vLLM server takes "
                "return_tokens_as_token_ids"
            ) from None

    @staticmethod
    def _sequences(batch: Batch) -> tuple[torch.Tensor, list[list[int]]]:
        mask = batch["attention_mask"].bool().cpu()
        ids = batch["input_ids"].cpu()
        return mask, [ids[b][mask[b]].tolist() for b in range(ids.shape[0])]

    def prefetch(self, batch: Batch) -> None:
        """Ask for ``batch``'s rows now; :meth:`signal` of the same batch then takes the
        answer (the Distiller prefetches the next step's batches while this one trains)."""
        _, sequences = self._sequences(batch)
        key = tuple(map(tuple, sequences))
        if key not in self._pending:
            self._pending[key] = self._ahead_pool.submit(self.rows, sequences)

    def signal(self, batch: Batch) -> Signal:
        """The served teacher's top-k signal of a token batch (``input_ids``,
        ``attention_mask``), placed at its real positions."""
        mask, sequences = self._sequences(batch)
        start = time.perf_counter()
        ahead = self._pending.pop(tuple(map(tuple, sequences)), None)
        items = ahead.result() if ahead is not None else self.rows(sequences)
        self.wait_s += time.perf_counter() - start
        placed = place_rows(items, mask)
        return Signal(topk=TopK(placed["ids"], placed["logprobs"], placed["tail"]))

    def figures(self) -> dict[str, Any]:
        """What a run's results record of the server (never the key)."""
        return {"url": self.url, "model": self.model, "top_k": self.k,
                "requests": self.requests, "wait_s": self.wait_s}  # fmt: skip

    def close(self) -> None:
        """Stop the request threads and close the HTTP connections."""
        self._ahead_pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._pool.shutdown(wait=True)
        self._client.close()


__all__ = ["ServedTeacher", "ServerError", "base_url"]
