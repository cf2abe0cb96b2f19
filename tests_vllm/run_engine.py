"""Runs one vLLM engine on the CPU and writes the greedy tokens of a batch of requests.

    python run_engine.py SPEC.json OUT.json

SPEC: {"model": DIR, "store": STORE or null, "store_only": bool (default false), "max_loras": int, "max_lora_rank": int,
       "store_in_config": bool (default false: the store goes to JDLORA_STORE; true: to additional_config),
       "fake_vllm_version": str (optional: vllm.__version__ as the plugin will see it),
       "remove_vllm_name": "module:Class.attr" (optional: deleted before the engine starts, as if it had moved),
       "bypass_platform_wrapper": bool (optional: vLLM builds its CPU punica wrapper without asking the platform),
       "block_jdlora_extension": bool (optional: jdlora_ops._C fails to import, as after a torch upgrade),
       "max_cpu_loras": int (optional), "max_tokens": int, "enable_lora": bool (default true),
       "max_num_seqs": int (default 64), "warmup": int (base-model requests run before timing, default 0),
       "requests": [{"prompt": str, "lora": null | {"name": str, "id": int, "path": str}}, ...]}
OUT:  {"tokens": [[int, ...] or null, ...], "errors": [str or null, ...], "seconds": float,
       "generate_seconds": float, "ttft": [float or null, ...], "plugin": {layers, table_bytes, ...} or {}}

A request whose adapter fails to load gets an error entry; the others are still
served (each request is submitted on its own after the mixed batch fails).
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
    if spec.get("peft_ops"):
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
    llm = LLM(model=spec["model"], tokenizer=spec["model"], dtype="float32", enforce_eager=True, max_model_len=128,
              max_num_seqs=spec.get("max_num_seqs", 64), seed=0, gpu_memory_utilization=0.5,
              disable_log_stats=False, **lora_args)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    reqs = spec["requests"]
    if spec.get("warmup"):
        llm.generate([reqs[0]["prompt"]] * spec["warmup"], params, use_tqdm=False)
    loras = [None if r["lora"] is None else LoRARequest(r["lora"]["name"], r["lora"]["id"], r["lora"]["path"])
             for r in reqs]
    prompts = [r["prompt"] for r in reqs]
    tokens, errors, ttft = [None] * len(reqs), [None] * len(reqs), [None] * len(reqs)
    t1 = time.time()
    try:
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
    plugin = {"lora_shrink_calls": calls["lora_shrink"]}
    if spec.get("store"):  # the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        from jdlora_ops.integrations.vllm.state import STATE

        plugin |= {"layers": len(STATE.layers), "table_bytes": STATE.table_bytes, "store_only": STATE.store_only,
                  "dense_bytes_dropped": STATE.dense_bytes_dropped}
    with open(out_path, "w") as fh:
        json.dump({"tokens": tokens, "errors": errors, "seconds": time.time() - t0,
                   "generate_seconds": gen_seconds, "ttft": ttft, "plugin": plugin}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
