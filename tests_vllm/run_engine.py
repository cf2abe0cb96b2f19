"""Runs one vLLM engine on the CPU and writes the greedy tokens of a batch of requests.

    python run_engine.py SPEC.json OUT.json

SPEC: {"model": DIR, "store": STORE or null, "store_only": bool (default false), "max_loras": int, "max_lora_rank": int,
       "store_in_config": bool (default false: the store goes to JDLORA_STORE; true: to additional_config),
       "fake_vllm_version": str (optional: vllm.__version__ as the plugin will see it),
       "remove_vllm_name": "module:Class.attr" (optional: deleted before the engine starts, as if it had moved),
       "bypass_platform_wrapper": bool (optional: vLLM builds its CPU punica wrapper without asking the platform),
       "block_jdlora_extension": bool (optional: jdlora_ops._C fails to import, as after a torch upgrade),
       "count_ops": bool (optional: count the plugin's lora_shrink calls, as with "peft_ops"),
       "max_cpu_loras": int (optional), "max_tokens": int, "enable_lora": bool (default true),
       "max_num_seqs": int (default 64), "warmup": int (base-model requests run before timing, default 0),
       "tensor_parallel_size": int (default 1; above 1, vLLM's multiprocessing executor starts one worker per rank),
       "logprobs": bool (default false: one batch; true: each request in its own call, with the logprob of every
                   prompt token and of every generated token),
       "profile": str (optional: cProfile statistics of the timed generate call go to this file),
       "requests": [{"prompt": str, "lora": null | {"name": str, "id": int, "path": str}}, ...]}
OUT:  {"tokens": [[int, ...] or null, ...], "errors": [str or null, ...], "seconds": float,
       "generate_seconds": float, "ttft": [float or null, ...],
       "prompt_logprobs", "logprobs": [[float, ...] or null, ...] (with "logprobs"; the first prompt token has none),
       "plugin": {layers, table_bytes, ... of rank 0, "ranks": [the same per tensor-parallel rank], lora_shrink_calls}}

A request whose adapter fails to load gets an error entry; the others are still
served (each request is submitted on its own after the mixed batch fails).
Requests with logprobs go one per call: vLLM 0.32's CPU LoRA logits path
fails on prompt logprobs for several LoRA requests in one call.
"""

import json
import os
import sys
import time


class _BlockExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "jdlora_ops._C":
            raise ImportError("jdlora_ops._C blocked by run_engine.py (block_jdlora_extension)")
        return None


def _rank_state(worker) -> dict:
    """The plugin's state in one vLLM worker (run there through ``collective_rpc``): with tensor parallelism the
    tables live in the workers, not in this process."""
    import torch
    from vllm.distributed import parallel_state

    from jdlora_ops.integrations.vllm.state import STATE

    group = parallel_state.get_tp_group()
    tables = {t.name: t for t in STATE.layers.values()}
    return {"tp_rank": int(group.rank_in_group), "tp_size": int(group.world_size),
            "threads": torch.get_num_threads(),
            "communicator": type(getattr(group, "device_communicator", None)).__name__,
            "layers": len(STATE.layers), "table_bytes": STATE.table_bytes, "store_only": STATE.store_only,
            "dense_bytes_dropped": STATE.dense_bytes_dropped,
            "u_rows": {n: [int(u.shape[1]) for u in t.U] for n, t in tables.items()},
            "vt_cols": {n: [int(v.shape[2]) for v in t.Vt] for n, t in tables.items()},
            # float64 sums of each slice's U: shards of a split slice add up to the whole, replicated ones repeat it
            "u_sums": {n: [float(u.double().sum()) for u in t.U] for n, t in tables.items()}}


def _token_logprobs(entries, token_ids) -> list:
    """The logprob of each given token (``None`` where vLLM gives none, e.g. the first prompt token)."""
    return [None if e is None else float(e[t].logprob) for e, t in zip(entries, token_ids)]


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    if spec.get("block_jdlora_extension"):
        sys.meta_path.insert(0, _BlockExtension())
    in_config = bool(spec.get("store_in_config"))
    if spec.get("store") and not in_config:
        os.environ["JDLORA_STORE"] = spec["store"]
    else:
        os.environ.pop("JDLORA_STORE", None)
    os.environ["JDLORA_STORE_ONLY"] = "1" if spec.get("store_only") else "0"
    os.environ["JDLORA_PEFT_OPS"] = "1" if spec.get("peft_ops") else "0"
    calls = {"lora_shrink": 0}
    if spec.get("peft_ops") or spec.get("count_ops"):
        # Counted, so that a test can tell the plugin's ops ran (the tokens alone would not).
        from jdlora_ops.integrations.vllm import punica

        shrink = punica.lora_shrink

        def counted(*args, **kwargs):
            calls["lora_shrink"] += 1
            return shrink(*args, **kwargs)

        punica.lora_shrink = counted
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    # These take effect before the engine loads its plugins (the engine runs in this process).
    if spec.get("fake_vllm_version"):
        vllm.__version__ = spec["fake_vllm_version"]
    if spec.get("remove_vllm_name"):
        import importlib

        module, _, qualname = spec["remove_vllm_name"].partition(":")
        owner_path, _, attr = qualname.rpartition(".")
        owner = importlib.import_module(module)
        for part in filter(None, owner_path.split(".")):
            owner = getattr(owner, part)
        delattr(owner, attr)
    if spec.get("bypass_platform_wrapper"):
        from vllm.lora import model_manager
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        model_manager.get_punica_wrapper = lambda *args, **kwargs: PunicaWrapperCPU(*args, **kwargs)

    t0 = time.time()
    lora_args = dict(enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"],
                     max_cpu_loras=spec.get("max_cpu_loras")) if spec.get("enable_lora", True) else {}
    if spec.get("store") and in_config:
        lora_args["additional_config"] = {"jdlora_store": spec["store"]}
    tp = int(spec.get("tensor_parallel_size", 1))
    if tp > 1:
        lora_args |= dict(tensor_parallel_size=tp, distributed_executor_backend="mp")
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="float32", enforce_eager=True, max_model_len=128,
              max_num_seqs=spec.get("max_num_seqs", 64), seed=0, gpu_memory_utilization=0.5,
              disable_log_stats=False, **lora_args)
    with_logprobs = bool(spec.get("logprobs"))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            **(dict(prompt_logprobs=0, logprobs=0) if with_logprobs else {}))
    reqs = spec["requests"]
    if spec.get("warmup"):
        llm.generate([reqs[0]["prompt"]] * spec["warmup"], params, use_tqdm=False)
    loras = [None if r["lora"] is None else LoRARequest(r["lora"]["name"], r["lora"]["id"], r["lora"]["path"])
             for r in reqs]
    prompts = [r["prompt"] for r in reqs]
    tokens, errors, ttft = [None] * len(reqs), [None] * len(reqs), [None] * len(reqs)
    prompt_lps, token_lps = [None] * len(reqs), [None] * len(reqs)
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t1 = time.time()
    try:
        if with_logprobs:
            outs = [llm.generate([p], params, lora_request=lr, use_tqdm=False)[0] for p, lr in zip(prompts, loras)]
            prompt_lps = [_token_logprobs(o.prompt_logprobs, o.prompt_token_ids) for o in outs]
            token_lps = [_token_logprobs(o.outputs[0].logprobs, o.outputs[0].token_ids) for o in outs]
        else:
            outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        gen_seconds = time.time() - t1
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        ttft = [getattr(o.metrics, "first_token_latency", None) if o.metrics is not None else None for o in outs]
    except Exception:
        for i, (p, lr) in enumerate(zip(prompts, loras)):
            try:
                tokens[i] = list(llm.generate([p], params, lora_request=lr, use_tqdm=False)[0].outputs[0].token_ids)
            except Exception as exc:  # the error the user would see for this request
                errors[i] = f"{type(exc).__name__}: {exc}"
        gen_seconds = time.time() - t1
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    # Counted in this process only: with tensor parallelism the workers run the ops.
    plugin = {"lora_shrink_calls": calls["lora_shrink"]}
    if spec.get("store"):
        ranks = sorted(llm.collective_rpc(_rank_state), key=lambda r: r["tp_rank"])
        plugin |= {k: v for k, v in ranks[0].items() if k in ("layers", "table_bytes", "store_only",
                                                               "dense_bytes_dropped")}
        plugin["ranks"] = ranks
    with open(out_path, "w") as fh:
        json.dump({"tokens": tokens, "errors": errors, "seconds": time.time() - t0,
                   "generate_seconds": gen_seconds, "ttft": ttft, "prompt_logprobs": prompt_lps,
                   "logprobs": token_lps, "plugin": plugin}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
