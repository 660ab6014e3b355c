"""vLLM's OpenAI-compatible server started on 127.0.0.1 from its own virtual environment, for
tests/test_vllm.py and benchmarks/served.py: a free port, the model served under ``name``, one
CPU thread, float32; ready once ``/v1/models`` answers; stopped on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def serve_vllm(python: Path, folder: str, log: Path, *, name: str, max_logprobs: int,
               timeout: float = 900) -> Iterator[str]:  # fmt: skip
    """The server's URL while the ``with`` lasts; RuntimeError (with the log's end) when it
    exits or is not ready within ``timeout`` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
           "--max-logprobs", str(max_logprobs), "--dtype", "float32",
           "--max-model-len", "512"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(
                        f"vLLM did not start in {timeout:g} s:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
