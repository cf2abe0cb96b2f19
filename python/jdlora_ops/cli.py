"""The ``jdlora`` command: compress PEFT adapters into a store, grow it, inspect it, export from it.

    jdlora compress ADAPTER_DIR... --rank R [--clusters K|auto] [--method full|diag] [--max-rel-error E] --out STORE
    jdlora add STORE ADAPTER_DIR... [--max-rel-error E]
    jdlora inspect STORE
    jdlora export STORE NAME --out DIR | jdlora export STORE (NAME...|--all) --out-dir DIR
    jdlora remove STORE NAME...
    jdlora verify STORE
    jdlora calibrate MODEL_DIR --text FILE... (--adapters DIR...|--modules NAME...) --out STATS
    jdlora demo [ARGS...]
    torchrun --nproc-per-node N -m jdlora_ops.cli compress ...   (modules shared by N processes, same store)

Bad input (missing or damaged files, adapters of another base model or with
other shapes, a rank the modules cannot hold, K outside [1, number of adapters],
an error budget outside (0, 1], duplicate names, a zero update, factors or
tables holding NaN or an infinity, ...) ends with a one-line
``jdlora: error: ...`` on stderr and exit status 2, and nothing written.
Stores and exported adapters are written atomically. ``verify`` lists every
table row holding NaN or an infinity before it fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp64": "float64",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


class CLIError(Exception):
    """Bad input found by the command line layer itself."""


def _dtype(name: str):
    import torch

    key = _DTYPES.get(name.lower())
    if key is None:
        raise CLIError(f"unknown dtype {name!r} (use float32, float64, bfloat16 or float16)")
    return getattr(torch, key)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_count(text: str) -> int:
    """``--target-bytes``: a positive number of bytes, optionally with a K/M/G/T (binary) suffix."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        v = float(t[:-1] if unit else t) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-bytes must be a number of bytes such as 500000 or 64M, "
                                         f"got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"--target-bytes must be > 0, got {text!r}")
    return int(v)


def _positive(kind: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{kind} must be >= 1, got {v}")
        return v

    return parse


def _clusters(text: str):
    if text == "auto":
        return text
    return _positive("--clusters")(text)


def _range(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clusters-range must be LOW:HIGH (integers), got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"--clusters-range must satisfy 1 <= LOW <= HIGH, got {text!r}")
    return low, high


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"jdlora: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jdlora", description="Joint compression of LoRA adapter collections.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("compress", help="compress PEFT adapter directories into a new store")
    c.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR",
                   help="adapter directories, folders of them, glob patterns or files listing them")
    c.add_argument("--rank", "-r", type=_positive("--rank"), default=None,
                   help="rank r of the shared bases (required unless --target-bytes/--target-ratio searches it)")
    c.add_argument("--clusters", "-k", type=_clusters, default=None,
                   help="number of clusters K (default 1), or 'auto': picked from --clusters-range by --tradeoff")
    c.add_argument("--target-bytes", type=_byte_count, default=None, metavar="B",
                   help="byte budget of the store's tables (e.g. 64M, 2G): each adapter's representation (its core "
                        "in the shared bases, with or without a private residual, its own truncated SVD at some rank, "
                        "or its factors) and, unless given, "
                        "--rank and --clusters are chosen for the least total relative error; prints the curve "
                        "searched")
    c.add_argument("--target-ratio", type=float, default=None, metavar="R",
                   help="byte budget as a fraction in (0, 1] of the adapters' own bytes (as --target-bytes)")
    c.add_argument("--no-residual", action="store_true",
                   help="with a byte budget: no core-plus-residual adapters (e.g. for the vLLM plug-in's "
                        "store-only mode, which has no dense slots for residuals)")
    c.add_argument("--clusters-range", type=_range, default=None, metavar="LOW:HIGH",
                   help="with --clusters auto: the cluster counts to consider (default 1:min(n, 64))")
    c.add_argument("--tradeoff", type=float, default=1.0, metavar="T",
                   help="with --clusters auto: minimise mean relative squared error + T x (compressed / original bytes)")
    c.add_argument("--method", choices=["full", "diag", "svd", "none"], default="full",
                   help="full (JD-Full), diag (JD-Diag), svd (per-adapter truncated SVD), none (no compression)")
    c.add_argument("--out", "-o", required=True, metavar="STORE", help="store directory to create")
    c.add_argument("--max-rel-error", type=float, default=None, metavar="E",
                   help="per-adapter error budget in (0, 1]: an adapter whose joint relative error exceeds E on "
                        "some module is kept as its own truncated SVD at the smallest rank meeting E (or "
                        "uncompressed when that needs its full rank)")
    c.add_argument("--weights", choices=["relative", "uniform"], default="relative",
                   help="objective weights: relative (1/||dW||^2, default) or uniform")
    c.add_argument("--max-iter", type=_positive("--max-iter"), default=50, help="JD iterations per cluster and module")
    c.add_argument("--tol", type=float, default=1e-6, help="JD stopping tolerance (relative objective change)")
    c.add_argument("--max-rounds", type=_positive("--max-rounds"), default=10, help="cluster fit/reassign rounds")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--compute-dtype", default="float32", help="float32 (default) or float64")
    c.add_argument("--store-dtype", default=None,
                   help="dtype of stored bases and cores (default: the adapters' dtype when they share one, else "
                        "float32)")
    c.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="store the shared bases quantized: int8 (one scale per row) or int4 (groups along the "
                        "reduction dimension); every core is refitted to the quantized bases (JD methods only)")
    c.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="with --quantize int4: values per scale, 32, 64 (default) or 128, capped at the row")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=_positive("--threads"), default=None, help="torch CPU threads")
    c.add_argument("--calibration", default=None, metavar="STATS",
                   help="activation-aware: weight errors by the inputs in these stats (jdlora calibrate)")
    c.add_argument("--damping", type=float, default=None,
                   help="with --calibration: C + damping * trace(C)/d * I is whitened (default 0.01)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    a = sub.add_parser("add", help="add adapters to a store without recompressing")
    a.add_argument("store", metavar="STORE")
    a.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    a.add_argument("--cluster", type=int, default=None, help="put the adapters in this cluster (default: best)")
    a.add_argument("--calibration", default=None, metavar="STATS",
                   help="stats of an activation-aware store (default: the path it was compressed with)")
    a.add_argument("--max-rel-error", type=float, default=None, metavar="E",
                   help="error budget in (0, 1] (default: the store's, if it was compressed with one)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--threads", type=_positive("--threads"), default=None)
    a.add_argument("--quiet", "-q", action="store_true")

    i = sub.add_parser("inspect", help="per-adapter and per-module errors, memory before and after")
    i.add_argument("store", metavar="STORE")
    i.add_argument("--modules", action="store_true", help="also print the per-module table")
    i.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")

    e = sub.add_parser("export", help="write adapters back as PEFT adapter directories")
    e.add_argument("store", metavar="STORE")
    e.add_argument("names", nargs="*", metavar="NAME")
    e.add_argument("--all", action="store_true", help="export every adapter of the store")
    e.add_argument("--out", "-o", default=None, metavar="DIR", help="the folder of one exported adapter")
    e.add_argument("--out-dir", default=None, metavar="DIR", help="write DIR/<name>/ for each adapter")
    e.add_argument("--dtype", default=None, help="dtype of the exported factors (default: the store's)")
    e.add_argument("--overwrite", action="store_true")

    rm = sub.add_parser("remove", help="remove adapters from a store (atomically)")
    rm.add_argument("store", metavar="STORE")
    rm.add_argument("names", nargs="+", metavar="NAME")

    v = sub.add_parser("verify", help="check every file of a store against its manifest checksums, and its "
                                      "tables for NaN or infinite values")
    v.add_argument("store", metavar="STORE")

    cal = sub.add_parser("calibrate", help="input second moments of the adapted modules of a base model")
    cal.add_argument("model", metavar="MODEL_DIR", help="a transformers model folder (nothing is downloaded)")
    cal.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files (paragraphs)")
    cal.add_argument("--out", "-o", required=True, metavar="STATS", help="stats directory to create")
    cal.add_argument("--adapters", nargs="+", metavar="ADAPTER_DIR", default=None,
                     help="calibrate every module these PEFT adapters target")
    cal.add_argument("--modules", nargs="+", metavar="NAME", default=None, help="module names to calibrate")
    cal.add_argument("--batch-size", type=_positive("--batch-size"), default=8)
    cal.add_argument("--max-length", type=_positive("--max-length"), default=512, help="tokens per text, at most")
    cal.add_argument("--dtype", default="float32", help="dtype the model runs in (statistics are float64)")
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--threads", type=_positive("--threads"), default=None)
    cal.add_argument("--overwrite", action="store_true")
    cal.add_argument("--quiet", "-q", action="store_true")

    d = sub.add_parser("demo", help="run the end-to-end demo", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    return p


# ------------------------------------------------------------------ commands
def _threads(n):
    if n:
        import torch

        torch.set_num_threads(n)


def _adapter_paths(args, quiet: bool | None = None) -> list[str]:
    from .peft_io import find_adapter_dirs

    paths, notes = find_adapter_dirs(args.adapters)
    if notes and not (args.quiet if quiet is None else quiet):
        print(f"found {len(paths)} adapters (" + "; ".join(notes) + ")", file=sys.stderr)
    return paths


def cmd_compress(args) -> int:
    """Compress; under torchrun (``WORLD_SIZE`` > 1) every rank runs this and they share the modules."""
    from .compress.distributed import init_from_env

    team = init_from_env(args.device)
    try:
        return _compress(args, team)
    finally:
        if team.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _compress(args, team) -> int:
    import torch

    from .compress import compress_to_store
    from .compress.error_budget import check_budget
    from .peft_io import PeftCollection
    from .store import StoreError, is_store

    _threads(args.threads)
    quiet = args.quiet or not team.is_root
    compute = _dtype(args.compute_dtype)
    if compute not in (torch.float32, torch.float64):
        raise CLIError("--compute-dtype must be float32 or float64")
    store_dtype = _dtype(args.store_dtype) if args.store_dtype else None
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        if not os.path.isdir(out) or os.listdir(out):
            what = "a store" if is_store(out) else "a non-empty path"
            raise CLIError(f"{args.out}: {what} already exists (use --overwrite to replace a store)")
    if os.path.exists(out) and os.path.isdir(out) and os.listdir(out) and not is_store(out):
        raise StoreError(f"{args.out}: exists, is not empty and is not a jdlora store; refusing to write there")
    if args.max_rel_error is not None:
        check_budget(args.max_rel_error)
    budgeted = args.target_bytes is not None or args.target_ratio is not None
    if budgeted:
        from .compress.allocation import check_target

        check_target(args.target_bytes, args.target_ratio)
        if args.method not in ("full", "diag"):
            raise CLIError(f"--target-bytes/--target-ratio choose per-adapter SVD where it pays themselves: "
                           f"--method must be full or diag, got {args.method}")
    elif args.rank is None:
        raise CLIError("--rank is required (or give --target-bytes/--target-ratio to choose it)")
    if args.no_residual and not budgeted:
        raise CLIError("--no-residual needs a byte budget (--target-bytes/--target-ratio): only the budget stores "
                       "residuals")
    if args.clusters is None and not budgeted:
        args.clusters = 1
    if not (args.tradeoff >= 0 and args.tradeoff != float("inf")):
        raise CLIError(f"--tradeoff must be a number >= 0, got {args.tradeoff}")
    if args.damping is not None and args.calibration is None:
        raise CLIError("--damping needs --calibration")
    if args.damping is not None and not args.damping > 0:
        raise CLIError(f"--damping must be > 0, got {args.damping}")
    collection = team.run(lambda: PeftCollection(_adapter_paths(args, quiet)))
    rank = args.rank
    if args.method in ("svd", "none"):
        top = max((e.rank for a in collection.adapters for e in a.modules.values()), default=0)
        if args.method == "svd" and rank > top:
            # A per-adapter SVD above the adapters' own rank stores zeros and grows the store.
            print(f"jdlora: --rank {rank} is above the adapters' largest rank {top}; per-adapter SVD uses rank {top}",
                  file=sys.stderr)
            rank = top
    stats = None
    if args.calibration is not None:
        from .compress.calibration import load_stats

        def read_stats():
            st = load_stats(args.calibration)
            st.check_modules({m.name: m.d_in for m in collection.modules}, where=f"--calibration {args.calibration}")
            return st

        stats = team.run(read_stats)
    log = (lambda msg: print(msg, file=sys.stderr)) if not quiet else None
    t0 = time.perf_counter()
    common = dict(
        method=args.method, num_clusters=args.clusters, weights=args.weights,
        max_iter=args.max_iter, tol=args.tol, max_rounds=args.max_rounds, seed=args.seed, dtype=compute,
        device=args.device, progress=not quiet, log=log, cluster_range=args.clusters_range, tradeoff=args.tradeoff,
    )
    if store_dtype is None:
        store_dtype = collection.dtype if collection.dtype in (torch.float16, torch.bfloat16, torch.float32) \
            else torch.float32
    result = compress_to_store(
        collection, rank, out, team=team, calibration=stats,
        calibration_path=None if stats is None else os.path.abspath(args.calibration), damping=args.damping,
        max_rel_error=args.max_rel_error, store_dtype=store_dtype, overwrite=args.overwrite,
        target_bytes=args.target_bytes, target_ratio=args.target_ratio, residual=not args.no_residual,
        quantize=args.quantize, group_size=args.group_size,
        log_curve=(lambda lines: print("byte budget: predicted mean relative squared error per candidate\n"
                                       + "\n".join(lines))) if budgeted else None, **common)
    seconds = time.perf_counter() - t0
    if team.is_root:
        _report_compress(args, result, collection, rank, out, store_dtype, seconds, team.world)
    return 0


def _report_compress(args, result, collection, rank, out, store_dtype, seconds, world) -> None:
    from .store import read_manifest

    s = result.summary()
    count = result.metadata.get("cluster_count")
    if count:
        print("clusters auto (tradeoff %g): " % count["tradeoff"] + "; ".join(
            f"K={p['clusters']} error {p['mean_rel_error']:.4f} bytes x{p['bytes_ratio']:.4f} score {p['score']:.4f}"
            for p in count["curve"]) + f"; chose K={count['chosen']}")
    budget = result.metadata.get("byte_budget")
    if budget:
        reps = budget["representations"]
        print(f"byte budget {budget['budget']:,} bytes ({budget['budget'] / max(budget['original_bytes'], 1):.4f} of "
              f"the original {budget['original_bytes']:,}): chose {budget['chosen']}; "
              + ", ".join(f"{k} x{v}" for k, v in sorted(reps.items()))
              + f"; predicted mean relative squared error {budget['predicted_mean_rel_error']:.4f} in "
              f"{budget['predicted_table_bytes']:,} table bytes")
    elif result.individual:
        paths = [ind.label for ind in result.individual.values()]
        print(f"error budget {args.max_rel_error:g}: {len(paths)} adapter(s) kept outside the joint tables ("
              + ", ".join(f"{p} x{paths.count(p)}" for p in sorted(set(paths))) + ")")
    print(
        f"compressed {len(result.all_names)} adapters x {len(result.modules)} modules "
        f"({args.method}, r={result.rank}, "
        f"{'per adapter' if args.method in ('svd', 'none') or not result.num_adapters else f'{result.num_clusters} clusters'})"
        f" in {seconds:.1f} s"
        f"{f' on {world} processes' if world > 1 else ''}: "
        f"relative squared error mean {s['mean_rel_error']:.4f} max {s['max_rel_error']:.4f}; "
        f"store {args.out}: {_bytes(_store_bytes(out, read_manifest(out)))} written in "
        f"{str(store_dtype).replace('torch.', '')} (the adapters: {_bytes(_adapter_bytes(collection))})"
    )
    vals = [v for per in _activation_weighted(result.metadata).values() for v in per]
    if vals:  # none when every adapter left the joint tables (a byte budget's choice)
        print(f"activation-weighted relative squared error mean {sum(vals) / len(vals):.4f} max {max(vals):.4f} "
              f"(inputs of {args.calibration})")
    q = read_manifest(out).get("quantization")
    if q:
        print(f"bases quantized: {_quantization_text(q)}; the errors above include it (cores refitted)")


def _quantization_text(q: dict) -> str:
    return (f"{q['format']}, " + ("one scale per row" if q["format"] == "int8" else
                                  f"groups of {q.get('group_size') or 64} along the reduction dimension")
            + " (capped at the row), scales in the store dtype")


def _activation_weighted(metadata: dict | None) -> dict:
    """module -> per-adapter activation-weighted relative errors of an activation-aware store ({} otherwise)."""
    return dict((metadata or {}).get("activation_weighted_rel_errors") or {})


def cmd_add(args) -> int:
    from .peft_io import PeftCollection
    from .store import load_store, read_manifest
    from .store_update import add_to_store

    _threads(args.threads)
    manifest = read_manifest(args.store)
    compressed = load_store(args.store)
    collection = PeftCollection(
        _adapter_paths(args), expect_base_model=manifest.get("base_model"), expect_modules=compressed.module_specs
    )
    res = add_to_store(args.store, collection, cluster=args.cluster, max_rel_error=args.max_rel_error,
                       calibration=args.calibration, device=args.device, progress=not args.quiet,
                       compressed=compressed)
    report, paths, budget, compressed = res.report, res.paths, res.budget, res.collection
    byte_rule = "multiplier" in ((compressed.metadata or {}).get("byte_budget") or {})
    for j, name in enumerate(report.names):
        if paths[j] != "jd":
            e = compressed.individual[name].rel_errors.values()
            why = (f"the store's byte budget rule; joint error mean {float(report.rel_errors[j].mean()):.4f}"
                   if byte_rule else f"joint error max {float(report.rel_errors[j].max()):.4f} > budget {budget:g}")
            print(f"added {name}: {paths[j]} ({why}), relative squared error max {max(e, default=0.0):.4f}")
            continue
        e = report.rel_errors[j]
        print(
            f"added {name}: cluster {int(report.clusters[j])}, relative squared error mean {float(e.mean()):.4f} "
            f"max {float(e.max()):.4f}"
        )
    print(f"projected {len(report.names)} adapter(s) in {report.seconds * 1e3:.1f} ms; store {args.store}")
    return 0


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda r: "  ".join(str(x).rjust(w) if k else str(x).ljust(w) for k, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _adapter_bytes(collection) -> int:
    """Bytes of the adapters' safetensors files as given."""
    from .peft_io import ADAPTER_WEIGHTS

    return sum(os.path.getsize(os.path.join(a.path, ADAPTER_WEIGHTS)) for a in collection.adapters)


def _bases_bytes(path: str, manifest: dict) -> int:
    """Bytes of the bases file's tables as stored (values and scales)."""
    from .store import StoreReader

    return StoreReader(path).table_bytes("bases")


def _store_bytes(path: str, manifest: dict) -> int:
    files = [MANIFEST_NAME, *(manifest.get("files") or {}).values()]
    return sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))


MANIFEST_NAME = "manifest.json"
_BYTES_PER_VALUE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def cmd_inspect(args) -> int:
    from .store import read_manifest

    m = read_manifest(args.store)
    mods = m["modules"]
    entries = [dict(a, path=a.get("path", "jd")) for a in m["adapters"]]
    own = m.get("individual") or []
    residual = {a["name"]: a for a in own if a["path"] == "residual"}
    entries += [dict(a, cluster="-", path=f"svd-{a['rank']}" if a["path"] == "svd" else a["path"])
                for a in own if a["path"] != "residual"]
    mem = m.get("memory_bf16") or {}
    on_disk = _store_bytes(args.store, m)
    per_value = _BYTES_PER_VALUE.get(str(m.get("dtype")), 2)
    for a in entries:
        a["bytes"] = _adapter_table_bytes(a, mods, per_value, residual.get(a["name"]) if "cluster" in a and
                                          a["cluster"] != "-" else None)
    original = mem.get("params_before", 0) * per_value
    aw = _activation_weighted(m.get("metadata"))
    if aw:
        jd = [a for a in entries if a["cluster"] != "-"]
        for i, a in enumerate(jd):
            vals = [per[i] for per in aw.values() if i < len(per)]
            a["activation_weighted_mean_error"] = sum(vals) / len(vals) if vals else 0.0
    if args.json:
        out = {k: m[k] for k in ("base_model", "method", "rank", "weights", "num_adapters", "num_clusters", "dtype")
               if k in m}
        out["memory_bf16"] = mem
        out["store_bytes"] = on_disk
        out["original_bytes_in_store_dtype"] = original
        out["max_rel_error"] = (m.get("metadata") or {}).get("max_rel_error")
        out["adapters"] = [{k: a[k] for k in ("name", "path", "cluster", "bytes", "mean_error", "max_error",
                                              "activation_weighted_mean_error") if k in a} for a in entries]
        out["byte_budget"] = (m.get("metadata") or {}).get("byte_budget")
        out["quantization"] = m.get("quantization")
        if m.get("quantization"):
            out["bases_bytes"] = _bases_bytes(args.store, m)
        out["calibration"] = (m.get("metadata") or {}).get("calibration")
        print(json.dumps(out, indent=1))
        return 0
    print(f"store      {args.store}")
    print(f"base model {m.get('base_model')}")
    print(f"method     {m['method']}  rank {m['rank']}  weights {m.get('weights')}  dtype {m.get('dtype')}")
    paths = [a["path"] for a in entries]
    budget = (m.get("metadata") or {}).get("max_rel_error")
    print(f"adapters   {len(entries)}  clusters {m.get('num_clusters')}  modules {len(mods)}"
          + (f"  error budget {budget:g}: " + ", ".join(f"{p} x{paths.count(p)}" for p in sorted(set(paths)))
             if budget is not None else ""))
    bb = (m.get("metadata") or {}).get("byte_budget")
    if bb:
        print(f"budget     {_bytes(bb['budget'])} of tables ({bb['budget'] / max(bb['original_bytes'], 1):.4f} of the "
              f"original): chose {bb['chosen']}, " + ", ".join(f"{p} x{paths.count(p)}" for p in sorted(set(paths))))
    if m.get("quantization"):
        print(f"bases      quantized {_quantization_text(m['quantization'])}: {_bytes(_bases_bytes(args.store, m))} "
              f"of bases and scales; errors include the quantization")
    if mem:
        print(
            f"memory     {_bytes(mem['bytes_before'])} -> {_bytes(mem['bytes_after'])} in bf16 "
            f"({mem['params_before']:,} -> {mem['params_after']:,} parameters, x{mem['ratio']:.1f})"
        )
    if original:
        print(f"store      {_bytes(on_disk)} on disk ({m.get('dtype')}) against {_bytes(original)} of original "
              f"adapters in {m.get('dtype')} (x{original / max(on_disk, 1):.1f})")
    all_errs = [e for a in entries for e in a["errors"]]
    if all_errs:
        print(f"error      relative squared error mean {sum(all_errs) / len(all_errs):.4f} max {max(all_errs):.4f}")
    vals = [v for per in aw.values() for v in per]
    if vals:
        cal = (m.get("metadata") or {}).get("calibration") or {}
        print(f"           activation-weighted mean {sum(vals) / len(vals):.4f} max {max(vals):.4f} (calibrated on "
              f"{cal.get('token_count')} tokens, damping {cal.get('damping')})")
    print()
    rows = [[a["name"], a["path"], str(a["cluster"]), _bytes(a["bytes"]), f"{a['mean_error']:.4f}",
             f"{a['max_error']:.4f}"]
            + ([f"{a['activation_weighted_mean_error']:.4f}" if "activation_weighted_mean_error" in a else "-"]
               if aw else [])
            + [mods[max(range(len(mods)), key=lambda j: a["errors"][j])]["name"] if a["errors"] else "-"]
            for a in entries]
    print(_table(rows, ["adapter", "path", "cluster", "bytes", "mean err", "max err"] + (["act. err"] if aw else [])
                 + ["worst module"]))
    if not args.modules and len(mods) > 12:
        print(f"\n({len(mods)} modules: pass --modules for the per-module table)")
    if args.modules or len(mods) <= 12:
        print()
        mrows = []
        for j, md in enumerate(mods):
            col = [a["errors"][j] for a in entries if a["errors"]]
            mrows.append([md["name"], f"{md['d_out']}x{md['d_in']}", str(md["rank"]),
                          f"{(sum(col) / len(col)) if col else 0:.4f}", f"{max(col) if col else 0:.4f}"])
        print(_table(mrows, ["module", "shape", "rank", "mean err", "max err"]))
    return 0


def _adapter_table_bytes(a: dict, mods: list[dict], per_value: int, residual: dict | None = None) -> int:
    """Bytes of one adapter's own tables: its cores (the shared bases not counted) and its residual's
    factors, or its own factors."""
    if residual is not None:
        return _adapter_table_bytes(dict(a, path="jd"), mods, per_value) + _adapter_table_bytes(residual, mods,
                                                                                              per_value)
    if a["path"] == "jd":
        return sum((md["rank"] ** 2 if md.get("sigma") == "full" else md["rank"]) for md in mods) * per_value
    if "factor_ranks" in a:
        return sum(k * (md["d_in"] + md["d_out"]) for md, k in zip(mods, a["factor_ranks"])) * per_value
    ranks = a.get("ranks") or [0] * len(mods)
    k = a.get("rank", 0) if a["path"].startswith("svd") else max(ranks, default=0)
    return sum(min(k, r) * (md["d_in"] + md["d_out"]) for md, r in zip(mods, ranks)) * per_value


def cmd_export(args) -> int:
    from .peft_io import export_peft_adapter
    from .store import load_store

    from .store import read_manifest

    if args.all == bool(args.names):
        raise CLIError("export: name the adapters or pass --all (not both)")
    if (args.out is None) == (args.out_dir is None):
        raise CLIError("export: give exactly one of --out (one adapter) or --out-dir")
    compressed = load_store(args.store)
    names = list(compressed.all_names) if args.all else list(args.names)
    if args.out is not None and len(names) != 1:
        raise CLIError(f"export: --out takes one adapter, {len(names)} given; use --out-dir")
    missing = [x for x in names if x not in compressed.all_names]
    if missing:
        raise CLIError(f"no adapter named {missing[0]!r} in {args.store} ({len(compressed.all_names)} adapters)")
    dtype = _dtype(args.dtype or str(read_manifest(args.store).get("dtype") or "float32"))
    outs = [args.out] if args.out is not None else [os.path.join(args.out_dir, x) for x in names]
    if not args.overwrite:
        taken = [o for o in outs if os.path.exists(o) and (not os.path.isdir(o) or os.listdir(o))]
        if taken:
            raise CLIError(f"{taken[0]}: exists and is not empty (pass --overwrite to replace it)")
    for name, out in zip(names, outs):
        out = export_peft_adapter(compressed, name, out, dtype=dtype, overwrite=args.overwrite)
        print(f"exported {name} to {out}")
    return 0


def cmd_demo(args) -> int:
    from jdlora_ops.demo import main as demo_main

    return demo_main(args.rest)


def cmd_remove(args) -> int:
    from ._finite import all_finite
    from .compress.projection import remove_adapters
    from .store import load_store, save_store

    # A store holding NaN or infinities can be repaired by removing the adapters concerned: the
    # tables written back are checked again, so what remains must be finite. Bases that are not
    # finite are rewritten rather than kept, to go through that check.
    compressed = load_store(args.store, check_finite=False)
    dt = next((cm.U.dtype for cm in compressed.modules.values()), None)
    finite_bases = all(all_finite(cm.U) and all_finite(cm.Vt) for cm in compressed.modules.values())
    emptied = remove_adapters(compressed, args.names)
    reuse = emptied == 0 and compressed.method in ("full", "diag") and finite_bases
    save_store(args.store, compressed, update=True, reuse_bases=reuse, dtype=dt)
    print(f"removed {len(args.names)} adapter(s) from {args.store}" + (f"; {emptied} cluster(s) emptied" if emptied else "")
          + f"; {len(compressed.all_names)} left")
    return 0


def cmd_verify(args) -> int:
    from .store import NonFiniteStoreError, verify_store

    problems: list[str] = []
    result = verify_store(args.store, problems=problems)
    for name, state in result.items():
        print(f"{state:12s} {name}")
    for p in problems:
        print(f"{'non-finite':12s} {p}")
    unchecked = [n for n, st in result.items() if st.startswith("no checksum")]
    print(f"{args.store}: {len(result) - len(unchecked)} of {len(result)} files match their checksums"
          + (f"; {len(unchecked)} have none (written before checksums)" if unchecked else ""))
    if problems:
        raise NonFiniteStoreError(f"{args.store}: {len(problems)} table row(s) hold NaN or infinite values, "
                                  f"the first: {problems[0]}")
    return 0


def cmd_calibrate(args) -> int:
    from .compress.calibration import adapter_modules, calibrate, read_texts, save_stats

    _threads(args.threads)
    if bool(args.adapters) == bool(args.modules):
        raise CLIError("calibrate: give the modules with exactly one of --adapters or --modules")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise CLIError(f"--out {out}: exists (pass --overwrite to replace it)")
    modules = adapter_modules(args.adapters) if args.adapters else list(args.modules)
    texts = read_texts(args.text)
    t0 = time.time()
    stats = calibrate(args.model, texts, modules, batch_size=args.batch_size, max_length=args.max_length,
                      dtype=_dtype(args.dtype), device=args.device, progress=not args.quiet)
    save_stats(stats, out, overwrite=args.overwrite)
    print(f"calibrated {len(modules)} modules on {stats.token_count} tokens of {len(texts)} texts in "
          f"{time.time() - t0:.1f} s; stats {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "demo":
        # Everything after "demo" belongs to the demo, including options like --help.
        return cmd_demo(argparse.Namespace(rest=argv[1:])) or 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help: return the status instead of exiting
        return int(exc.code or 0)
    handlers = {"compress": cmd_compress, "add": cmd_add, "inspect": cmd_inspect, "export": cmd_export,
                "calibrate": cmd_calibrate, "verify": cmd_verify,
                "remove": cmd_remove}
    try:
        rc = handlers[args.command](args) or 0
        sys.stdout.flush()  # a reader that went away (``| head``) shows here, inside the handler below
        return rc
    except BrokenPipeError:
        # Like any filter whose reader closed the pipe: stop quietly, with the shell's SIGPIPE status.
        # Python would otherwise print the error again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("jdlora: interrupted; nothing was changed", file=sys.stderr)
        return 130
    except (CLIError, ValueError, KeyError, OSError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, KeyError) and exc.args:
            msg = str(exc.args[0])
        print(f"jdlora: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
