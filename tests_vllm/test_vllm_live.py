"""``jdlora add`` / ``jdlora remove`` on the store a running ``vllm serve`` serves (run by scripts/test_vllm.sh).

One server, one thread, on a store with one cluster per adapter (``--method
svd``: every ``add`` brings clusters with new bases, which the server loads
into its tables; every ``remove`` renumbers the clusters after it). Requests
before, during and after the updates are compared by token ids with each
other and with a fresh engine on the final store; a damaged generation and an
add for another model leave the server serving what it served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fixtures  # noqa: E402
from serve import post, vllm_serve  # noqa: E402

PROMPTS = ["the man said to his mother that", "water is a good thing for", "when the world came up",
           "one day the boy will go", "each year the people find", "my father made a house",
           "there was a little animal", "what did the old man say", "she came back home after"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
           TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
TOKENS = 8
LONG = 240  # tokens of the requests kept in flight across the updates


def _jdlora(*args) -> tuple[int, str]:
    """``jdlora`` in this process (torch is imported already, so an update takes a fraction of a second)."""
    import contextlib
    import io

    from jdlora_ops.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(list(args))
    return rc, out.getvalue()


class Server:
    def __init__(self, url, log_path):
        self.url, self.log_path = url, log_path

    def complete(self, model, j, max_tokens=TOKENS):
        code, body = post(self.url + "/v1/completions", {
            "model": model, "prompt": PROMPTS[j], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        return code, (body["choices"][0]["token_ids"] if code == 200 else body)

    def tokens(self, model, j, max_tokens=TOKENS):
        code, body = self.complete(model, j, max_tokens)
        assert code == 200, (model, body, self.log()[-3000:])
        return body

    def stream(self, model, j, out: dict):
        """Streams a long completion into ``out``: token ids and the arrival time of each chunk."""
        body = {"model": model, "prompt": PROMPTS[j], "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "stream": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        out.update(tokens=[], times=[])
        with urllib.request.urlopen(req, timeout=180) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "choices" not in chunk:
                    out["error"] = chunk
                    return
                out["tokens"] += chunk["choices"][0].get("token_ids") or []
                out["times"].append(time.time())

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_live")
    model = fixtures.make_model(str(root / "model"))
    adapters = fixtures.make_adapters(model, str(root / "adapters"), n=9, clusters=3)
    store = str(root / "store")
    rc, out = _jdlora("compress", *adapters[:4], "--method", "svd", "--rank", "4", "--out", store, "-q")
    assert rc == 0, out
    # adapters of a model with other shapes, labelled for this one: `jdlora add` must refuse them
    other = fixtures.make_model(str(root / "other_model"), hidden=256, intermediate=512)
    wrong = fixtures.make_adapters(other, str(root / "wrong"), n=1, clusters=1)
    cfg_path = os.path.join(wrong[0], "adapter_config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    cfg["base_model_name_or_path"] = os.path.abspath(model)
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh)
    return {"root": root, "model": model, "adapters": adapters, "store": store, "wrong": wrong}


@pytest.fixture(scope="module")
def server(world):
    env = dict(ENV, JDLORA_STORE=world["store"], VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    log_path = world["root"] / "serve.log"
    with vllm_serve(world["model"], ["--max-loras", "4", "--max-cpu-loras", "8", "--max-lora-rank", "8",
                                     "--max-model-len", "256"], env, log_path) as url:
        yield Server(url, log_path)


def _stage(store: str, side: str, *commands) -> None:
    """Runs ``jdlora`` commands on a copy of ``store`` (``side``) and returns at once."""
    shutil.rmtree(side, ignore_errors=True)
    shutil.copytree(store, side)
    for args in commands:
        rc, out = _jdlora(args[0], side, *args[1:])
        assert rc == 0, out


def _switch(store: str, side: str) -> None:
    """Makes the staged copy the store's next generation as a writer commits one: the tensor files first, the
    manifest last (one rename), so the switch itself takes no time."""
    from jdlora_ops.store import read_manifest

    for name in read_manifest(side)["files"].values():
        if not os.path.exists(os.path.join(store, name)):
            shutil.copy(os.path.join(side, name), os.path.join(store, name))
    os.replace(os.path.join(side, "manifest.json"), os.path.join(store, "manifest.json"))


def _damage(store: str, kind: str) -> None:
    """Flips one bit of the store's ``kind`` tensor file (again: repairs it)."""
    from jdlora_ops.store import read_manifest

    path = os.path.join(store, read_manifest(store)["files"][kind])
    blob = bytearray(open(path, "rb").read())
    blob[-1] ^= 0x01
    open(path, "wb").write(bytes(blob))


def test_live_store_updates(world, server):
    from jdlora_ops.store import read_manifest

    store, ads = world["store"], world["adapters"]
    t0 = time.time()
    # before: the store's four adapters (by name: the resolver), the base model; adapter_4 is not there yet
    before = {i: server.tokens(f"adapter_{i}", i) for i in range(4)}
    base = server.tokens("base", 8)
    long_before = {}
    runs = [threading.Thread(target=lambda i=i: long_before.__setitem__(i, server.tokens(f"adapter_{i}", i, LONG)))
            for i in (0, 1)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(timeout=180)
    code, body = post(server.url + "/v1/load_lora_adapter", {"lora_name": "adapter_4", "lora_path": store})
    assert code == 404, body
    assert server.complete("adapter_4", 4)[0] in (400, 404)

    # during: two long requests in flight (one on an adapter about to be removed) while `jdlora add` and
    # `jdlora remove` switch the store to its next generation (staged on a copy, so that the switch lands
    # while the requests run whatever the machine's load)
    side = str(world["root"] / "side")
    _stage(store, side, ("add", *ads[4:6], "-q"), ("remove", "adapter_1"))
    streams = {0: {}, 1: {}}
    threads = [threading.Thread(target=server.stream, args=(f"adapter_{i}", i, streams[i])) for i in streams]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while not all(s.get("times") for s in streams.values()):  # both are generating
        assert time.time() < deadline, server.log()[-3000:]
        time.sleep(0.005)
    _switch(store, side)
    switched = time.time()
    new = {i: server.tokens(f"adapter_{i}", i) for i in (4, 5)}  # served while the long ones run
    for t in threads:
        t.join(timeout=180)
    print(f"the long requests ended {streams[1]['times'][-1] - switched:.2f} s after the switch")
    assert streams[1]["times"][-1] > switched, "the long requests ended before the switch"
    for i in (0, 1):
        assert "error" not in streams[i], streams[i]["error"]
        assert streams[i]["tokens"] == long_before[i], f"in-flight adapter_{i} changed"

    # after: the removed adapter is refused, with a reason; the others give the tokens they gave before
    code, body = server.complete("adapter_1", 1)
    assert code == 404 and "was removed from the store" in json.dumps(body), body
    assert {i: server.tokens(f"adapter_{i}", i) for i in (0, 2, 3)} == {i: before[i] for i in (0, 2, 3)}
    assert server.tokens("base", 8) == base
    # `jdlora add` / `jdlora remove` on the live store itself; /v1/load_lora_adapter finds an adapter added while
    # the server runs, and refuses a removed one
    rc, out = _jdlora("add", store, ads[6], "-q")
    assert rc == 0, out
    rc, out = _jdlora("remove", store, "adapter_3")
    assert rc == 0, out
    code, body = post(server.url + "/v1/load_lora_adapter", {"lora_name": "adapter_6", "lora_path": store})
    assert code == 200, body
    new[6] = server.tokens("adapter_6", 6)
    # (a name the server loaded before is only loaded again in place)
    code, body = post(server.url + "/v1/load_lora_adapter", {"lora_name": "adapter_1", "lora_path": store,
                                                              "load_inplace": True})
    assert code == 404, body
    code, body = server.complete("adapter_3", 3)
    assert code == 404 and "was removed from the store" in json.dumps(body), body

    # an add whose modules do not fit the store (nor the served model): refused by `jdlora add`; still serving
    manifest = read_manifest(store)
    rc, out = _jdlora("add", store, *world["wrong"], "-q")
    assert rc != 0 and "is 256 x 512 but the store has 128 x 256" in out, out
    assert read_manifest(store) == manifest
    assert server.tokens("adapter_6", 6) == new[6]
    # a generation failing its checksum (a writer whose disk damaged a file): not served, the previous one is
    _stage(store, side, ("add", ads[7], "-q"))
    _damage(side, "cores")
    _switch(store, side)
    code, body = server.complete("adapter_7", 7)  # the resolver finds no such adapter: vLLM's own 404
    assert code == 404, body
    assert server.tokens("adapter_0", 0) == before[0]
    log = server.log()
    assert "a new generation cannot be served" in log and "checksum mismatch" in log and "stays served" in log
    # repaired, and the next update is served
    _damage(store, "cores")
    rc, out = _jdlora("add", store, ads[8], "-q")
    assert rc == 0, out
    new[7], new[8] = server.tokens("adapter_7", 7), server.tokens("adapter_8", 8)
    assert server.tokens("adapter_5", 5) == new[5]
    served_seconds = time.time() - t0

    # a fresh engine on the final store gives the same tokens
    final = [a["name"] for a in read_manifest(store)["adapters"]]
    assert final == ["adapter_0", "adapter_2", "adapter_4", "adapter_5", "adapter_6", "adapter_7", "adapter_8"]
    from jdlora_ops.integrations.vllm import store_lora_request

    reqs = []
    for name in final:
        lr = store_lora_request(store, name)
        reqs.append({"prompt": PROMPTS[int(name.split("_")[1])],
                     "lora": {"name": lr.lora_name, "id": lr.lora_int_id, "path": lr.lora_path}})
    spec = {"model": world["model"], "store": store, "max_loras": len(final) + 1, "max_lora_rank": 8,
            "max_tokens": TOKENS, "requests": reqs}
    spec_path, out_path = world["root"] / "fresh.json", world["root"] / "fresh.out.json"
    spec_path.write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, os.path.join(HERE, "run_engine.py"), str(spec_path), str(out_path)],
                       env=dict(ENV, VLLM_ENABLE_V1_MULTIPROCESSING="0"), capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    fresh = json.loads(out_path.read_text())
    assert fresh["errors"] == [None] * len(final)
    served = {**before, **new}
    assert fresh["tokens"] == [served[int(n.split("_")[1])] for n in final]
    print(f"served through the updates in {served_seconds:.1f} s")
