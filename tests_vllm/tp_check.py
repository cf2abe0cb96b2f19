"""The same requests at tensor_parallel_size 1 and 2, compared token by token and logprob by logprob.

Shared by the engine test (test_vllm_plugin.py, the fixture model) and
bench/bench_vllm_tp.py (both model variants, with vLLM's own LoRA path for
reference). Requests go through run_engine.py with ``"logprobs": true``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import fixtures

#: The fixture model's variants for tensor parallelism at size 2 (make_model keyword arguments): ``kv1`` has
#: one KV head, which vLLM gives to both ranks; ``kv2`` has two, one per rank.
TP_MODELS = {"kv1": dict(heads=2, kv_heads=1), "kv2": dict(heads=4, kv_heads=2, seed=1)}

#: Largest |logprob(TP=2) - logprob(TP=1)| accepted in float32. Measured on both variants: 4.8e-7 (one float32
#: step at |logprob| ~ 5); the store adapters move these prompt logprobs by more than 0.02.
TP_LOGPROB_BOUND = 1e-5

#: Request layout of :func:`tp_requests`: which adapter each request uses.
STORE_ADAPTERS = (0, 1, 2, 3, 5)
PEFT_ADAPTER = 4
BASE_REPEATS = (0, 1)  # prompts asked again without an adapter, after the first eight requests


def tp_requests(prompts, store: str, adapters, *, peft_all: bool = False) -> list[dict]:
    """Ten requests: store adapters 0-3 and 5 on prompts 0-3 and 5, PEFT ``adapters[4]`` on prompt 4, the base
    model on prompts 6 and 7, then the base model again on prompts 0 and 1 (to show what the adapters change).
    ``peft_all``: every adapter from its PEFT folder instead (vLLM's own LoRA path)."""
    reqs = []
    for j in range(8):
        if j in STORE_ADAPTERS and not peft_all:
            lora = {"name": f"adapter_{j}", "id": 600 + j, "path": store}
        elif j in STORE_ADAPTERS or j == PEFT_ADAPTER:
            lora = {"name": f"adapter_{j}", "id": 1 + j, "path": adapters[j]}
        else:
            lora = None
        reqs.append({"prompt": prompts[j], "lora": lora})
    return reqs + [{"prompt": prompts[j], "lora": None} for j in BASE_REPEATS]


def logprob_gap(one: dict, two: dict, rows=None) -> float:
    """Largest |difference| between two runs' prompt and generated-token logprobs (``rows``: those requests).

    Raises ``AssertionError`` when the runs do not line up (other lengths, logprobs missing in one only)."""
    worst = 0.0
    for key in ("prompt_logprobs", "logprobs"):
        for j, (a, b) in enumerate(zip(one[key], two[key])):
            if rows is not None and j not in rows:
                continue
            assert a is not None and b is not None and len(a) == len(b), (key, j, a, b)
            assert [x is None for x in a] == [x is None for x in b], (key, j)
            worst = max([worst] + [abs(x - y) for x, y in zip(a, b) if x is not None])
    return worst


def adapter_shift(run: dict, j: int) -> float:
    """How far adapter request ``j`` moves its prompt's logprobs from the base-model request on the same prompt."""
    base = run["prompt_logprobs"][8 + BASE_REPEATS.index(j)]
    return max(abs(x - y) for x, y in zip(run["prompt_logprobs"][j][1:], base[1:]))


def make_case(root: str, name: str, *, n_adapters: int = 6) -> dict:
    """A variant's model, PEFT adapters and lossless store (rank = the adapters' rank, a cluster per adapter)."""
    model = fixtures.make_model(os.path.join(root, name, "model"), **TP_MODELS[name])
    seed = TP_MODELS[name].get("seed", 0)
    adapters = fixtures.make_adapters(model, os.path.join(root, name, "adapters"), n=n_adapters, clusters=2,
                                      seed=seed)
    store = os.path.join(root, name, "store")
    r = subprocess.run([sys.executable, "-m", "jdlora_ops.cli", "compress", *adapters, "--rank", "4", "--clusters",
                        str(n_adapters), "--out", store, "-q"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"make_case({name!r}): jdlora compress failed:\n{r.stdout}{r.stderr}")
    return {"model": model, "adapters": adapters, "store": store}
