"""End-to-end tests of the jdlora vLLM plugin on vLLM's CPU build (run by scripts/test_vllm.sh).

Each engine runs in its own process (tests_vllm/run_engine.py) with one
thread. Greedy tokens are compared between

* vLLM's own LoRA path on the original PEFT adapters (its last slot left empty:
  vLLM's CPU ops give base-only tokens the last slot's adapter), and the
  plugin serving a lossless store (rank = the adapters' rank, one cluster per
  adapter) mixed with PEFT adapters in one batch, every slot filled, base
  requests included;
* a lossy store (one cluster) and vLLM's own path on the PEFT adapters
  exported from that store;
* the plugin at tensor_parallel_size 2 (one worker process per rank) and 1,
  which must also agree on every prompt and generated token's logprob;

and ``vllm serve`` answers OpenAI completions for store adapters named in the
request's ``model`` field. Where the plugin cannot load (a vLLM version outside
its range, a patched name gone, a hook that does not fire, jdlora_ops failing
to import), an engine configured with a store does not start, and one without
a store serves as usual.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fixtures  # noqa: E402
import tp_check  # noqa: E402
from serve import post, vllm_serve  # noqa: E402

N_ADAPTERS = 6
PROMPTS = ["the man said to his mother that", "water is a good thing for", "when the world came up",
           "one day the boy will go", "each year the people find", "my father made a house",
           "there was a little animal", "what did the old man say"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
           VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _jdlora(*args):
    r = subprocess.run([sys.executable, "-m", "jdlora_ops.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    model = fixtures.make_model(str(root / "model"))
    adapters = fixtures.make_adapters(model, str(root / "adapters"), n=N_ADAPTERS, clusters=2)
    lossless = str(root / "store_lossless")
    _jdlora("compress", *adapters, "--rank", "4", "--clusters", str(N_ADAPTERS), "--out", lossless, "-q")
    lossy = str(root / "store_lossy")
    _jdlora("compress", *adapters, "--rank", "4", "--clusters", "1", "--out", lossy, "-q")
    exported = []
    for i in range(N_ADAPTERS):
        out = str(root / "exported" / f"adapter_{i}")
        _jdlora("export", lossy, f"adapter_{i}", "--out", out)
        exported.append(out)
    return {"root": root, "model": model, "adapters": adapters, "lossless": lossless, "lossy": lossy,
            "exported": exported}


def _lora(name, lid, path):
    return {"name": name, "id": lid, "path": path}


def run_engine(world, name, *, requests, store=None, max_loras, max_lora_rank=8, expect_fail=False,
               store_only=False, **extra):
    """``extra``: further SPEC keys of run_engine.py (store_in_config, fake_vllm_version, remove_vllm_name)."""
    spec = {"model": world["model"], "store": store, "max_loras": max_loras, "max_lora_rank": max_lora_rank,
            "max_tokens": 8, "requests": requests, "store_only": store_only, **extra}
    spec_path = world["root"] / f"{name}.json"
    out_path = world["root"] / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, os.path.join(HERE, "run_engine.py"), str(spec_path), str(out_path)],
                       env=ENV, capture_output=True, text=True, timeout=240)
    if expect_fail:
        assert r.returncode != 0, f"engine {name} started but should not have"
        assert not out_path.exists(), f"engine {name} served requests but should not have"
        return r.stdout + r.stderr
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return json.loads(out_path.read_text())


def _requests(world, paths):
    """Prompt j uses adapter ``paths[j]`` (``None``: base model)."""
    return [{"prompt": PROMPTS[j], "lora": None if p is None else _lora(*p)} for j, p in enumerate(paths)]


@pytest.fixture(scope="session")
def reference(world):
    """vLLM's own LoRA path: adapters 0..5 on the first six prompts, base model on the last two.
    max_loras is one above the adapters in use, so vLLM's last slot stays empty."""
    paths = [(f"adapter_{i}", i + 1, world["adapters"][i]) for i in range(N_ADAPTERS)] + [None, None]
    out = run_engine(world, "vllm_peft", requests=_requests(world, paths), max_loras=N_ADAPTERS + 1)
    base = run_engine(world, "vllm_base", requests=_requests(world, [None] * len(PROMPTS)),
                      max_loras=N_ADAPTERS + 1)
    assert out["errors"] == [None] * len(PROMPTS) and base["errors"] == [None] * len(PROMPTS)
    # the adapters matter: every adapter request's tokens differ from the base model's
    for j in range(N_ADAPTERS):
        assert out["tokens"][j] != base["tokens"][j], f"adapter_{j} does not change the greedy tokens"
    assert out["tokens"][N_ADAPTERS:] == base["tokens"][N_ADAPTERS:]
    return out["tokens"], base["tokens"]


def test_lossless_store_mixed_with_peft_matches_vllm_lora(world, reference):
    """Adapters 0-2 from the lossless store, 3-5 as PEFT folders, two base requests, all in one batch
    with every slot taken (the layout where vLLM's own CPU path gives base rows the last slot's adapter)."""
    want, base = reference
    paths = [(f"adapter_{i}", 100 + i, world["lossless"]) for i in range(3)]
    paths += [(f"adapter_{i}", i + 1, world["adapters"][i]) for i in range(3, N_ADAPTERS)] + [None, None]
    out = run_engine(world, "jd_lossless", requests=_requests(world, paths), store=world["lossless"],
                     max_loras=N_ADAPTERS)
    assert out["errors"] == [None] * len(PROMPTS)
    assert out["tokens"] == want
    assert out["tokens"][N_ADAPTERS:] == base[N_ADAPTERS:]  # base rows untouched with the last slot in use


def test_peft_adapters_through_jdlora_ops_match_vllm_lora(world, reference):
    """No store, JDLORA_PEFT_OPS=1: vLLM's PEFT slots go through lora_shrink / lora_expand; vLLM's own
    tokens, every slot in use, base rows untouched."""
    want, base = reference
    paths = [(f"adapter_{i}", i + 1, world["adapters"][i]) for i in range(N_ADAPTERS)] + [None, None]
    out = run_engine(world, "jd_peft_ops", requests=_requests(world, paths), max_loras=N_ADAPTERS, peft_ops=True)
    assert out["errors"] == [None] * len(PROMPTS)
    assert out["plugin"]["lora_shrink_calls"] > 0
    assert out["tokens"] == want
    assert out["tokens"][N_ADAPTERS:] == base[N_ADAPTERS:]


def test_lossy_store_matches_its_exported_peft_adapters(world, reference):
    _, base = reference
    store = [(f"adapter_{i}", 200 + i, world["lossy"]) for i in range(N_ADAPTERS)] + [None, None]
    exported = [(f"adapter_{i}", i + 1, world["exported"][i]) for i in range(N_ADAPTERS)] + [None, None]
    got = run_engine(world, "jd_lossy", requests=_requests(world, store), store=world["lossy"],
                     max_loras=N_ADAPTERS)
    want = run_engine(world, "vllm_exported", requests=_requests(world, exported), max_loras=N_ADAPTERS + 1)
    assert got["errors"] == [None] * len(PROMPTS)
    assert got["tokens"] == want["tokens"]
    assert got["tokens"][N_ADAPTERS:] == base[N_ADAPTERS:]


def _mixed_store(world) -> tuple[str, list[str]]:
    """The lossy store with every representation: adapters 0 and 1 a core plus a rank-2 residual, adapter 2
    its own rank-2 SVD, adapter 3 its original factors, 4 and 5 cores alone; and each exported."""
    import torch

    from jdlora_ops.compress.error_budget import drop_from_tables, individual_at_ranks
    from jdlora_ops.compress.residual import residual_adapters
    from jdlora_ops.peft_io import PeftCollection
    from jdlora_ops.store import load_store, save_store

    path = str(world["root"] / "store_mixed")
    if not os.path.isdir(path):
        c = load_store(world["lossy"])
        col = PeftCollection(world["adapters"])
        c.individual.update(residual_adapters(c, col, ["adapter_0", "adapter_1"], torch.tensor([2, 2])))
        c.individual.update(individual_at_ranks(col, ["adapter_2", "adapter_3"], torch.tensor([2, 4]),
                                                torch.tensor([4, 4])))
        drop_from_tables(c, torch.tensor([x in ("adapter_2", "adapter_3") for x in c.adapter_names]))
        save_store(path, c)
    exported = []
    for i in range(N_ADAPTERS):
        out = str(world["root"] / "exported_mixed" / f"adapter_{i}")
        if not os.path.isdir(out):
            _jdlora("export", path, f"adapter_{i}", "--out", out)
        exported.append(out)
    return path, exported


def test_store_with_residuals_and_own_factors_matches_its_exported_peft_adapters(world, reference):
    """Cores with residuals (both paths on the same tokens), adapters kept outside the joint tables (vLLM's
    dense slots, through the baseline ops) and cores alone, in one batch: vLLM's own tokens on the
    adapters the store exports; store-only mode refuses the ones that need dense slots."""
    _, base = reference
    path, exported = _mixed_store(world)
    store = [(f"adapter_{i}", 500 + i, path) for i in range(N_ADAPTERS)] + [None, None]
    own = [(f"adapter_{i}", i + 1, exported[i]) for i in range(N_ADAPTERS)] + [None, None]
    got = run_engine(world, "jd_mixed", requests=_requests(world, store), store=path, max_loras=N_ADAPTERS,
                     count_ops=True)
    want = run_engine(world, "vllm_exported_mixed", requests=_requests(world, own), max_loras=N_ADAPTERS + 1)
    assert got["errors"] == [None] * len(PROMPTS)
    assert got["tokens"] == want["tokens"]
    assert got["tokens"][N_ADAPTERS:] == base[N_ADAPTERS:]
    assert got["plugin"]["lora_shrink_calls"] > 0
    refused = run_engine(world, "jd_mixed_store_only", requests=_requests(world, store), store=path,
                         max_loras=N_ADAPTERS, store_only=True)
    for i in range(4):
        assert "store-only mode" in refused["errors"][i], refused["errors"][i]
    assert refused["errors"][4:] == [None] * (len(PROMPTS) - 4)
    assert refused["tokens"][4:6] == got["tokens"][4:6]


def test_store_only_mode_drops_dense_stacks_and_refuses_peft(world, reference):
    """Store adapters in vLLM's slots without vLLM's dense per-slot stacks: same tokens; PEFT refused."""
    want, base = reference
    paths = [(f"adapter_{i}", 400 + i, world["lossless"]) for i in range(N_ADAPTERS)] + [None]
    paths.append(("adapter_0", 1, world["adapters"][0]))  # a PEFT folder: refused in store-only mode
    out = run_engine(world, "jd_store_only", requests=_requests(world, paths), store=world["lossless"],
                     max_loras=64, store_only=True)
    assert out["tokens"][:N_ADAPTERS] == want[:N_ADAPTERS]
    assert out["tokens"][N_ADAPTERS] == base[N_ADAPTERS]
    assert out["errors"][:N_ADAPTERS + 1] == [None] * (N_ADAPTERS + 1)
    assert "PEFT adapters are not accepted" in out["errors"][N_ADAPTERS + 1]
    plugin = out["plugin"]
    assert plugin["store_only"] and plugin["layers"] == 8  # 2 layers x (qkv, o, gate_up, down)
    # vLLM's dense stacks for 64 slots at max_lora_rank 8 are gone; the store's tables remain
    assert plugin["dense_bytes_dropped"] > 4 * plugin["table_bytes"] > 0


def test_unknown_store_adapter_fails_that_request_only(world, reference):
    want, _ = reference
    paths = [("adapter_0", 300, world["lossless"]), ("no_such_adapter", 301, world["lossless"]), None]
    out = run_engine(world, "jd_unknown", requests=_requests(world, paths), store=world["lossless"], max_loras=4)
    assert out["errors"][0] is None and out["tokens"][0] == want[0]
    assert out["errors"][1] is not None and "holds no adapter named 'no_such_adapter'" in out["errors"][1]
    assert out["errors"][2] is None and out["tokens"][2] == reference[1][2]


def test_store_rank_above_max_lora_rank_fails_at_start_up(world):
    big = str(world["root"] / "store_rank12")
    _jdlora("compress", *world["adapters"], "--rank", "12", "--clusters", "1", "--out", big, "-q")
    log = run_engine(world, "jd_rank", requests=_requests(world, [None]), store=big, max_loras=2,
                     max_lora_rank=8, expect_fail=True)
    assert "its rank 12 is above vLLM's max_lora_rank 8" in log


def test_store_for_another_model_fails_at_start_up(world):
    other = fixtures.make_model(str(world["root"] / "other_model"), hidden=256, intermediate=512)
    ads = fixtures.make_adapters(other, str(world["root"] / "other_adapters"), n=2, clusters=1)
    store = str(world["root"] / "store_other")
    _jdlora("compress", *ads, "--rank", "4", "--out", store, "-q")
    log = run_engine(world, "jd_other", requests=_requests(world, [None]), store=store, max_loras=2,
                     expect_fail=True)
    assert "a store for another base model" in log


def test_vllm_serve_answers_for_store_adapters(world, reference):
    want, base = reference
    env = dict(ENV, JDLORA_STORE=world["lossless"], VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
    with vllm_serve(world["model"], ["--max-loras", "4", "--max-lora-rank", "8", "--max-model-len", "128"], env,
                    world["root"] / "serve.log") as url:
        for j, model in [(0, "adapter_0"), (1, "adapter_1"), (2, "adapter_2"), (6, "base")]:
            code, body = post(url + "/v1/completions", {"model": model, "prompt": PROMPTS[j], "max_tokens": 8,
                                                        "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert code == 200, body
            expected = (want if model != "base" else base)[j]
            assert body["choices"][0]["token_ids"] == expected, (model, body)
        code, body = post(url + "/v1/completions", {"model": "no_such_adapter", "prompt": "the", "max_tokens": 2})
        assert code in (400, 404), body
        code, body = post(url + "/v1/completions", {"model": "adapter_0", "prompt": PROMPTS[0], "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True, "return_token_ids": True})
        assert code == 200 and body["choices"][0]["token_ids"] == want[0]  # still serving


def test_plugin_refuses_unchecked_vllm_versions(monkeypatch):
    import vllm

    from jdlora_ops.integrations.vllm import _vllm_private as vp

    vp.check_version()  # the installed one is checked
    monkeypatch.setattr(vllm, "__version__", "0.40.1", raising=False)
    with pytest.raises(vp.PluginUnavailable, match=r"vLLM 0.40.1 is not supported; the plugin was checked against "
                                                   r">=0.32.0,<0.34.0 \(0.32.x, 0.33.x\)"):
        vp.check_version()
    for v in ("0.32.0", "0.32.3", "0.33.0", "0.33.1+cu130"):
        monkeypatch.setattr(vllm, "__version__", v)
        vp.check_version()
    for v in ("0.31.9", "0.34.0", "1.0.0"):
        monkeypatch.setattr(vllm, "__version__", v)
        with pytest.raises(vp.PluginUnavailable, match=f"vLLM {v} is not supported"):
            vp.check_version()


def test_installed_vllm_source_has_every_name_the_plugin_relies_on():
    """The ast check of the plugin's vLLM surface, on the installed vllm-cpu sources; and the live patch targets."""
    from jdlora_ops.integrations.vllm import _vllm_private as vp

    version, problems = vp.check_sources()
    assert version == "0.32.0"
    assert problems == []
    assert vp.patch_problems() == []


def test_patch_targets_are_checked_live(monkeypatch):
    """A patched name with another signature (or none) is refused before anything is patched."""
    from vllm.lora import worker_manager

    from jdlora_ops.integrations.vllm import _vllm_private as vp

    monkeypatch.setattr(worker_manager.WorkerLoRAManager, "_load_adapter", lambda self, request, strict: None)
    problems = vp.patch_problems()
    assert len(problems) == 1 and ("WorkerLoRAManager._load_adapter: signature changed: expected (self, "
                                   "lora_request), found (self, request, strict)") in problems[0]
    monkeypatch.delattr(worker_manager.WorkerLoRAManager, "_load_adapter")
    assert "WorkerLoRAManager._load_adapter is missing" in vp.patch_problems()[0]


UNUSABLE = {
    # vLLM outside the checked range, the store named in additional_config (seen only once the engine is built)
    "version_config": dict(fake_vllm_version="0.40.1", store_in_config=True),
    # the same with the store in JDLORA_STORE (seen when the plugin registers)
    "version_env": dict(fake_vllm_version="0.40.1"),
    # a supported version where a patched name has moved
    "moved_config": dict(remove_vllm_name="vllm.lora.worker_manager:WorkerLoRAManager._load_adapter",
                         store_in_config=True),
    # jdlora_ops itself fails to import (its extension built for another torch)
    "import_env": dict(block_jdlora_extension=True),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_store_on_a_vllm_the_plugin_cannot_patch_fails_at_start_up(world, case):
    """The engine refuses to start rather than answer store requests with the base model."""
    reqs = _requests(world, [("adapter_0", 500, world["lossless"]), None])
    log = run_engine(world, f"jd_unusable_{case}", requests=reqs, store=world["lossless"], max_loras=2,
                     expect_fail=True, **UNUSABLE[case])
    assert f"A jdlora store is configured ({world['lossless']}), so the engine does not start" in log
    if case.startswith("version"):
        assert ("vLLM 0.40.1 is not supported; the plugin was checked against >=0.32.0,<0.34.0 (0.32.x, 0.33.x)"
                in log)
    elif case.startswith("import"):
        assert "jdlora_ops vLLM plugin: jdlora_ops cannot be imported (ImportError: jdlora_ops: the native " \
               "extension jdlora_ops._C failed to load" in log
    else:
        assert "vLLM 0.32.0 is in the supported range >=0.32.0,<0.34.0 (0.32.x, 0.33.x) but cannot be patched" in log
        assert "WorkerLoRAManager._load_adapter is missing" in log


def test_store_fails_at_start_up_when_a_hook_does_not_take_effect(world):
    """A vLLM that builds its punica wrapper without asking the platform: the hook installs but never fires."""
    log = run_engine(world, "jd_bypassed", requests=_requests(world, [None]), store=world["lossless"], max_loras=2,
                     expect_fail=True, bypass_platform_wrapper=True)
    assert "calls PunicaWrapperCPU, not the jdlora punica wrapper (the get_punica_wrapper hook did not take " \
           "effect), so store adapters would get base-model outputs" in log


@pytest.mark.parametrize("case", ["version", "import"])
def test_plugin_that_cannot_load_without_a_store_stays_out_of_the_way(world, reference, case):
    """Installed but not configured, the plugin lets vLLM serve as usual when it cannot load."""
    _, base = reference
    extra = dict(fake_vllm_version="0.40.1") if case == "version" else dict(block_jdlora_extension=True)
    out = run_engine(world, f"jd_unusable_no_store_{case}", requests=_requests(world, [None, None]), max_loras=2,
                     **extra)
    assert out["errors"] == [None, None]
    assert out["tokens"] == base[:2]



# --- tensor parallelism -------------------------------------------------------

def test_tensor_parallel_store_matches_one_rank(world):
    """tensor_parallel_size=2 (vLLM's multiprocessing executor, two workers on gloo) against 1, on the fixture
    model, whose one KV head vLLM gives to both ranks: store adapters, a PEFT adapter and the base model give the
    same greedy tokens, and every prompt and generated token the same float32 logprob within TP_LOGPROB_BOUND.
    Two slots for six adapters, one request per call: slots are reassigned on both ranks between requests.
    (bench/bench_vllm_tp.py runs this for a model with one KV head per rank too, and against vLLM's own path.)"""
    reqs = tp_check.tp_requests(PROMPTS, world["lossless"], world["adapters"])
    runs = {tp: run_engine(world, f"jd_tp{tp}", requests=reqs, store=world["lossless"], max_loras=2,
                           tensor_parallel_size=tp, logprobs=True) for tp in (1, 2)}
    one, two = runs[1], runs[2]
    assert one["errors"] == [None] * len(reqs) and two["errors"] == [None] * len(reqs), (one["errors"], two["errors"])
    assert two["tokens"] == one["tokens"]
    gap = tp_check.logprob_gap(one, two)
    assert gap < tp_check.TP_LOGPROB_BOUND, f"max |logprob(TP=2) - logprob(TP=1)| = {gap:.3g}"
    for j in tp_check.BASE_REPEATS:  # the adapters matter here, far above that bound
        assert one["tokens"][j] != one["tokens"][8 + j], f"adapter_{j} does not change the greedy tokens"
        assert tp_check.adapter_shift(one, j) > 1000 * tp_check.TP_LOGPROB_BOUND
    # each rank holds its shard of the tables, with one thread per process
    ranks1, ranks2 = one["plugin"]["ranks"], two["plugin"]["ranks"]
    assert [r["tp_rank"] for r in ranks2] == [0, 1] and all(r["threads"] == 1 for r in ranks1 + ranks2)
    qkv, o, gate_up, down = (f"model.layers.0.{m}" for m in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                              "mlp.gate_up_proj", "mlp.down_proj"))
    full = ranks1[0]
    assert full["u_rows"][qkv] == [128, 64, 64] and full["vt_cols"][o] == [128]
    for r in ranks2:
        assert r["u_rows"][qkv] == [64, 64, 64]  # q split; k and v (one head of 64) whole on both ranks
        assert r["u_rows"][gate_up] == [128, 128] and r["vt_cols"][o] == [64] and r["vt_cols"][down] == [128]
        assert r["u_rows"][o] == full["u_rows"][o] and r["vt_cols"][qkv] == full["vt_cols"][qkv]
    q_parts, k_parts, v_parts = zip(*(r["u_sums"][qkv] for r in ranks2))
    assert sum(q_parts) == pytest.approx(full["u_sums"][qkv][0], rel=1e-6, abs=1e-6)
    for parts, whole in ((k_parts, full["u_sums"][qkv][1]), (v_parts, full["u_sums"][qkv][2])):
        assert parts[0] == parts[1] == pytest.approx(whole, rel=1e-6, abs=1e-6)


def test_output_shards_follow_vllm_slicing_of_lora_b():
    """Which block of each slice's rows a rank holds, read from vLLM's layer classes (built without an engine):
    q split by rank, k/v shared by the ranks of a replicated KV head, fused single-slice layers refused."""
    import torch
    from vllm.lora.layers import MergedQKVParallelLinearWithLoRA, QKVParallelLinearWithLoRA, RowParallelLinearWithLoRA
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    from jdlora_ops.integrations.vllm import _vllm_private as vp

    def layer(cls, base_cls, tp, rank, **base_attrs):
        base = object.__new__(base_cls)
        torch.nn.Module.__init__(base)
        base.__dict__.update(base_attrs)
        lay = object.__new__(cls)
        torch.nn.Module.__init__(lay)
        lay.base_layer, lay.tp_size, lay.tp_rank = base, tp, rank
        lay.n_slices = 3 if cls is MergedQKVParallelLinearWithLoRA else 1
        if cls is MergedQKVParallelLinearWithLoRA:
            lay.output_ids = (rank, rank // base.num_kv_head_replicas, rank // base.num_kv_head_replicas)
        return lay

    # 4 ranks, 2 KV heads: each KV head on 2 ranks
    assert [vp.output_shards(layer(MergedQKVParallelLinearWithLoRA, QKVParallelLinear, 4, r, num_kv_head_replicas=2))
            for r in range(4)] == [((r, 4), (r // 2, 2), (r // 2, 2)) for r in range(4)]
    assert vp.output_shards(layer(MergedQKVParallelLinearWithLoRA, QKVParallelLinear, 1, 0,
                                  num_kv_head_replicas=1)) == ((0, 1),) * 3
    assert vp.output_shards(layer(RowParallelLinearWithLoRA, RowParallelLinear, 2, 1)) == ((0, 1),)
    assert "serves the fused projection QKVParallelLinear as one LoRA slice" in vp.output_shards(
        layer(QKVParallelLinearWithLoRA, QKVParallelLinear, 2, 1, num_kv_head_replicas=1))
