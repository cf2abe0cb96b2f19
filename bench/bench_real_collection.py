"""Task benefit kept by compressed adapters: the real collection of bench/real_collection.

    python bench/bench_real_collection.py run --group grid [--shard I/N]    # issue 10: the settings grid
    python bench/bench_real_collection.py run --group aware --calibration STATS  # issue 11: activation-aware
    python bench/bench_real_collection.py run --group quant [--shard I/N]   # quantized bases against float ones
    python bench/bench_real_collection.py report                            # JSON, markdown, PNG
    python bench/bench_real_collection.py run --collection large [--shard I/N] [--calibration STATS]
    python bench/bench_real_collection.py report --collection large

Each setting goes through the CLI exactly as a user runs it (``jdlora compress
ADAPTERS ... --out STORE``, then ``jdlora export STORE --all``); every exported
adapter is merged into the base model (all-MiniLM-L6-v2) and its task is
evaluated with its head on that task's held-out sentences (the first
``--eval-per-label`` of each label from the task's eval split, the same for
every setting). Reported per setting: the store's bytes on disk (every file
of the store directory) against the adapters' safetensors files, the mean and
max relative squared reconstruction error, and the retained task benefit
``(acc_compressed - acc_base) / (acc_lora - acc_base)``: per adapter (mean and
min over the adapters whose LoRA gains at least 5 points on these sentences;
a smaller gain is a handful of sentences and makes the ratio noise), and pooled (summed
gains over summed LoRA gains), overall and per family. One torch thread.

Grid: JD-Full and JD-Diag x r in {4, 8, 16, 32} x K in {1, 4, 8}, without the
settings whose store would hold at least as many values as the adapters
themselves (no compression; with 32 rank-8 adapters, r = 32 and K = 8 is one
of them); per-adapter SVD at ranks 1, 2, 4 and 8 (lossless); the error budget
``--max-rel-error`` 0.1 and 0.3 on JD-Full r = 8 and r = 16 with one cluster.
Aware: JD-Full r in {8, 16, 32} x K in {1, 4} with ``--calibration``.
Quant: JD-Full r in {8, 16, 32} x K in {1, 4} (not r = 32 with K = 4, two
thirds of the bytes) with float, ``--quantize int8`` and ``--quantize int4``
(groups of 64) bases, in one run so that each quantized store is paired with
its float store of the same commit; reported with the retained loss
reduction and its intervals beside the pooled accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "real_collection"))
import minilm  # noqa: E402

import retained as retained_metric  # noqa: E402

RESULTS = os.environ.get("JDLORA_REAL_RESULTS") or os.path.join(HERE, "results")
# collection -> (adapters, run parts). The large one is built by make_collection.py train --large.
COLLECTIONS = {
    "small": (os.path.join(HERE, "real_collection", "adapters"), os.path.join(RESULTS, "real_collection_parts")),
    "large": (os.path.join(os.path.dirname(HERE), "build", "real_collection_large"),
              os.path.join(RESULTS, "real_collection_large_parts")),
}
ADAPTERS, PARTS = COLLECTIONS["small"]


def use_collection(name: str) -> None:
    global ADAPTERS, PARTS
    ADAPTERS, PARTS = COLLECTIONS[name]
    ADAPTERS = os.environ.get("JDLORA_REAL_ADAPTERS") or ADAPTERS
    if not os.path.isdir(ADAPTERS):
        raise SystemExit(f"{ADAPTERS} is missing: build it with 'python bench/real_collection/make_collection.py "
                         "train --large' (see bench/real_collection/README.md)")


def grid_settings() -> list[dict]:
    """The grid, the settings that say most first (a run cut short still compares them)."""
    full = [{"method": "full", "rank": r, "clusters": k} for k in (1, 4, 8) for r in (4, 8, 16, 32)]
    diag = [{"method": "diag", "rank": r, "clusters": k} for k in (1, 4, 8) for r in (4, 8, 16, 32)]
    svd = [{"method": "svd", "rank": r, "clusters": 1} for r in (1, 2, 4, 8)]
    budget = [{"method": "full", "rank": r, "clusters": 1, "max_rel_error": e} for r in (16, 8) for e in (0.1, 0.3)]
    return svd[:3] + full[:4] + budget[:2] + full[4:] + diag + budget[2:] + svd[3:]


BUDGET_RATIOS = (0.05, 0.1, 0.15, 0.25, 0.4, 0.6)


AWARE_BUDGET_RATIOS = (0.05, 0.1, 0.15, 0.25)


def large_settings(stats: str | None = None) -> list[dict]:
    """The large collection's grid: per-adapter SVD, the byte budget, JD-Full over K up to 32 and r up
    to 32, JD-Diag; the settings that say most first (a run cut short still compares them). With ``stats``
    (``jdlora calibrate``) also the byte budget with ``--calibration``."""
    full = [{"method": "full", "rank": r, "clusters": k} for r in (16, 8, 32, 4) for k in (1, 4, 16, 32)]
    diag = [{"method": "diag", "rank": r, "clusters": k} for r in (16, 32) for k in (4, 16)]
    svd = [{"method": "svd", "rank": r, "clusters": 1} for r in (1, 2, 4)]
    budget = [{"method": "budget", "ratio": x} for x in BUDGET_RATIOS]
    residual = [{"method": "budget", "ratio": x, "residual": True} for x in BUDGET_RATIOS]
    aware = [{"method": "budget", "ratio": x, "residual": True, "calibration": stats} for x in AWARE_BUDGET_RATIOS]
    return svd + budget + full[:8] + diag + full[8:] + residual + (aware if stats else [])


def quant_settings() -> list[dict]:
    return [{"method": "full", "rank": r, "clusters": k, **({"quantize": q} if q else {})}
            for r, k in ((8, 1), (16, 1), (8, 4), (32, 1), (16, 4)) for q in (None, "int8", "int4")]


def aware_settings(stats: str) -> list[dict]:
    return [{"method": "full", "rank": r, "clusters": k, "calibration": stats} for r in (8, 16, 32) for k in (1, 4)]


def label(s: dict) -> str:
    if s["method"] in ("base", "lora"):
        return s["method"]
    if s["method"] == "budget":  # without residuals (--no-residual), or with them (the default since they came)
        return f"budget x{s['ratio']:g}" + (" +res" if s.get("residual") else "") + (
            " aware" if s.get("calibration") else "")
    name = f"svd r={s['rank']}" if s["method"] == "svd" else f"JD-{s['method'].capitalize()} r={s['rank']} K={s['clusters']}"
    if s.get("max_rel_error") is not None:
        name += f" E={s['max_rel_error']:g}"
    if s.get("calibration"):
        name += " aware"
    if s.get("quantize"):
        name += f" {s['quantize']}"
    return name


def stored_values(s: dict, n: int, modules: list[tuple[int, int, int]]) -> int:
    """Values a JD store holds (bases and cores), to skip settings that compress nothing."""
    core = s["rank"] ** 2 if s["method"] == "full" else s["rank"]
    return sum(s["clusters"] * s["rank"] * (d_out + d_in) + n * core for d_out, d_in, _ in modules)


class Collection:
    """The committed adapters, their heads, tasks and eval sentences, and the base model."""

    def __init__(self, per_label: int | None):
        from jdlora_ops.peft_io import find_adapter_dirs, read_peft_adapter
        from safetensors.torch import load_file

        self.paths, _ = find_adapter_dirs([ADAPTERS])
        self.tasks, self.heads = {}, {}
        for p in self.paths:
            name = os.path.basename(p)
            with open(os.path.join(p, "task.json"), encoding="utf-8") as fh:
                task = json.load(fh)
            keep = [i for i, y in enumerate(task["eval_labels"])
                    if per_label is None or task["eval_labels"][:i].count(y) < per_label]
            task["eval_texts"] = [task["eval_texts"][i] for i in keep]
            task["eval_labels"] = torch.tensor([task["eval_labels"][i] for i in keep])
            self.tasks[name] = task
            w = load_file(os.path.join(p, minilm.HEAD_FILE))
            head = torch.nn.Linear(w["weight"].shape[1], w["weight"].shape[0])
            head.weight.data.copy_(w["weight"])
            head.bias.data.copy_(w["bias"])
            self.heads[name] = head.requires_grad_(False)
        first = read_peft_adapter(self.paths[0])
        self.modules = [(e.d_out, e.d_in, e.rank) for e in first.modules.values()]
        self.bytes = sum(os.path.getsize(os.path.join(p, "adapter_model.safetensors")) for p in self.paths)
        self.model, self.tok = minilm.load_base()

    def scores(self, name: str, factors: dict | None) -> tuple[list, list]:
        """Per-eval-sentence cross-entropy and correctness of the task with these factors merged."""
        task = self.tasks[name]
        with minilm.MergedAdapter(self.model, factors or {}):
            return minilm.scores(self.model, self.tok, self.heads[name], task["eval_texts"], task["eval_labels"])


def read_factors(path: str) -> dict:
    from jdlora_ops.peft_io import read_peft_adapter

    ad = read_peft_adapter(path)
    return {m: ad.load(m) for m in ad.modules}


def jdlora(*argv: str) -> str:
    """Run the ``jdlora`` CLI in this process; returns what it printed."""
    from jdlora_ops.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(a) for a in argv])
    if rc:
        raise RuntimeError(f"jdlora {' '.join(map(str, argv))} failed ({rc}): {buf.getvalue()}")
    return buf.getvalue()


def run_setting(col: Collection, s: dict, work: str) -> dict:
    from jdlora_ops.store import load_store

    row = {"setting": label(s), **{k: v for k, v in s.items() if k not in ("max_rel_error", "calibration")},
           "budget": s.get("max_rel_error")}  # max_rel_error below is the measured one
    if s.get("calibration"):
        row["calibration"] = True  # the stats' path is this machine's; the command line shows it as STATS
    t0 = time.time()
    if s["method"] in ("base", "lora"):
        factors = {n: (read_factors(p) if s["method"] == "lora" else None) for n, p in zip(col.tasks, col.paths)}
        row.update(bytes=col.bytes if s["method"] == "lora" else 0, mean_rel_error=0.0, max_rel_error=0.0)
    else:
        store, exported = os.path.join(work, "store"), os.path.join(work, "exported")
        shutil.rmtree(work, ignore_errors=True)
        cmd = (["compress", ADAPTERS, "--target-ratio", s["ratio"]] if s["method"] == "budget" else
               ["compress", ADAPTERS, "--rank", s["rank"], "--clusters", s["clusters"], "--method", s["method"]])
        if s["method"] == "budget" and not s.get("residual"):
            cmd += ["--no-residual"]
        cmd += ["--out", store, "--threads", 1, "--quiet", "--seed", 0]
        if s.get("max_rel_error") is not None:
            cmd += ["--max-rel-error", s["max_rel_error"]]
        if s.get("calibration"):
            cmd += ["--calibration", s["calibration"]]
        if s.get("quantize"):
            cmd += ["--quantize", s["quantize"]]
        # Recorded as a user would type it: paths relative to the repository, the temporary store as STORE.
        shown = [os.path.relpath(str(a), os.path.dirname(HERE)) if str(a) == ADAPTERS
                 else "STATS" if a == s.get("calibration") else "STORE" if a == store else a for a in cmd]
        row["cli"] = "jdlora " + " ".join(map(str, shown))
        row["cli_output"] = jdlora(*cmd).strip()
        row["compress_seconds"] = round(time.time() - t0, 1)
        jdlora("export", store, "--all", "--out-dir", exported)
        summary = load_store(store).summary()
        row.update(bytes=sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)), **summary)
        factors = {n: read_factors(os.path.join(exported, n)) for n in col.tasks}
    scored = {n: col.scores(n, f) for n, f in factors.items()}
    row["accuracy"] = {n: sum(ok) / len(ok) for n, (_, ok) in scored.items()}
    row["ce"] = {n: [round(x, 5) for x in ce] for n, (ce, _) in scored.items()}
    row["correct"] = {n: ok for n, (_, ok) in scored.items()}
    row["bytes_ratio"] = row["bytes"] / col.bytes
    row["seconds"] = round(time.time() - t0, 1)
    return row


def cmd_run(args) -> None:
    torch.set_num_threads(1)
    col = Collection(args.eval_per_label)
    # The quant group scores base and LoRA again: its rows keep every sentence's loss, which the
    # continuous metric needs (the grid's rows of 2026-12-04 kept accuracies only).
    settings = [{"method": "base"}, {"method": "lora"}] if args.group in ("grid", "large", "quant") else []
    if args.group in ("grid", "large"):
        n = len(col.paths)
        original = sum(n * r * (d_out + d_in) for d_out, d_in, r in col.modules)
        stats = os.path.abspath(args.calibration) if args.calibration else None
        if stats and not os.path.isdir(stats):
            raise SystemExit(f"--calibration {args.calibration}: not a directory written by 'jdlora calibrate'")
        for s in grid_settings() if args.group == "grid" else large_settings(stats):
            if s["method"] in ("full", "diag") and stored_values(s, n, col.modules) >= original:
                print(f"skip {label(s)}: the store would hold {stored_values(s, n, col.modules)} values, the adapters "
                      f"{original} (no compression)")
                continue
            settings.append(s)
    elif args.group == "quant":
        settings += quant_settings()
    else:
        if not args.calibration or not os.path.isdir(args.calibration):
            raise SystemExit("--group aware needs --calibration STATS (a directory written by 'jdlora calibrate')")
        settings = aware_settings(os.path.abspath(args.calibration))
    i, n_shard = map(int, args.shard.split("/"))
    os.makedirs(PARTS, exist_ok=True)
    done = {r["setting"] for r in load_rows() if r["group"] == args.group}
    # The split is over the whole grid, the settings already run dropped after: shards started at different
    # times (one finishing a setting while the other starts) still split the same way.
    settings = [s for k, s in enumerate(settings) if k % n_shard == i and label(s) not in done]
    out = os.path.join(PARTS, f"{args.group}_{i}of{n_shard}.jsonl")
    with open(out, "a", encoding="utf-8") as fh, tempfile.TemporaryDirectory() as work:  # resumes a cut run
        for s in settings:
            try:
                row = run_setting(col, s, os.path.join(work, "setting"))
            except RuntimeError as exc:
                if s["method"] != "budget":
                    raise
                print(f"skip {label(s)}: {exc}", flush=True)  # a budget below the smallest store this collection has
                continue
            row["group"] = args.group
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            acc = sum(row["accuracy"].values()) / len(row["accuracy"])
            print(f"{row['setting']:28s} bytes x{row['bytes_ratio']:.3f} error mean {row['mean_rel_error']:.3f} "
                  f"max {row['max_rel_error']:.3f} mean accuracy {acc:.4f} ({row['seconds']} s)", flush=True)
    print(f"-> {out}")


# ------------------------------------------------------------------ report
MIN_GAIN = 0.05  # per-adapter ratios only for adapters whose LoRA gains this much accuracy on the eval sentences


def retained(row: dict, base: dict, lora: dict, tasks: dict) -> dict:
    gains = {n: lora[n] - base[n] for n in base}
    per = {n: (row["accuracy"][n] - base[n]) / g for n, g in gains.items() if g >= MIN_GAIN}
    fams: dict = {}
    for n in base:
        f = fams.setdefault(tasks[n]["family"], [0.0, 0.0])
        f[0] += row["accuracy"][n] - base[n]
        f[1] += gains[n]
    pooled = sum(row["accuracy"][n] - base[n] for n in base) / sum(gains.values())
    return {"pooled": pooled, "mean": sum(per.values()) / len(per), "min": min(per.values()),
            "adapters_with_gain": len(per), "per_family": {f: a / b for f, (a, b) in sorted(fams.items()) if b > 0}}


def budget_of(row: dict) -> float | None:
    """The setting's --max-rel-error (from its label: in a row, max_rel_error is the measured maximum)."""
    return float(row["setting"].split("E=")[1].split()[0]) if "E=" in row["setting"] else None


def load_rows() -> list[dict]:
    """Every run part's rows; parts committed gzipped (``.jsonl.gz``, the large collection's) read as well."""
    import gzip

    rows = []
    for f in sorted(os.listdir(PARTS)):
        opener = gzip.open if f.endswith(".gz") else open
        with opener(os.path.join(PARTS, f), "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "cpu")
    except OSError:
        return platform.processor() or "cpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def md_table(rows: list[dict], families: list[str]) -> str:
    head = ["setting", "store bytes", "x original", "rel. error mean", "max", "retained pooled", "mean", "min",
            *families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r["retained"]
        lines.append("| " + " | ".join([
            r["setting"], f"{r['bytes']:,}", f"{r['bytes_ratio']:.3f}", f"{r['mean_rel_error']:.3f}",
            f"{r['max_rel_error']:.3f}", f"{t['pooled']:.2f}", f"{t['mean']:.2f}", f"{t['min']:.2f}",
            *[f"{t['per_family'].get(f, float('nan')):.2f}" for f in families]]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str, groups) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pick, style in groups:
        sel = sorted((r for r in rows if pick(r)), key=lambda r: r["bytes_ratio"])
        if sel:
            ax.plot([r["bytes_ratio"] for r in sel], [r["retained"]["pooled"] for r in sel], style, label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes / original adapter bytes")
    ax.set_ylabel("retained task benefit (pooled over adapters)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LARGE_MANIFEST = os.environ.get("JDLORA_REAL_MANIFEST") or os.path.join(HERE, "real_collection", "collection_large.json")
SPLITS = ("tune", "heldout")


def large_metrics(rows: list[dict], tasks: dict) -> None:
    """Adds ``loss`` and ``acc`` (retained benefit with intervals) per split to every row."""
    by = {r["setting"]: r for r in rows}
    base, lora = by["base"], by["lora"]
    for r in rows:
        for split in (*SPLITS, "all"):
            names = sorted(n for n in base["ce"] if split == "all" or tasks[n]["split"] == split)
            r.setdefault("loss", {})[split] = retained_metric.retained(base["ce"], lora["ce"], r["ce"], names, loss=True)
            r.setdefault("acc", {})[split] = retained_metric.retained(base["correct"], lora["correct"], r["correct"],
                                                                      names, loss=False)


def frontier(rows: list[dict], split: str) -> set[str]:
    """Settings no other setting beats in both bytes and pooled retained loss (on ``split``)."""
    pts = [(r["bytes_ratio"], loss_kept(r, split), r["setting"]) for r in rows
           if r["method"] in ("full", "diag", "svd")]
    return {name for b, q, name in pts if not any(b2 <= b and q2 > q for b2, q2, _ in pts)}


def envelope_row(rows: list[dict], bytes_ratio: float, split: str) -> dict | None:
    """The baseline setting (JD-Full, JD-Diag, per-adapter SVD) within these bytes that keeps the most."""
    cands = [r for r in rows if r["method"] in ("full", "diag", "svd") and r["bytes_ratio"] <= bytes_ratio * (1 + 1e-9)]
    return max(cands, key=lambda r: loss_kept(r, split)) if cands else None


def envelope_at(rows: list[dict], bytes_ratio: float, split: str) -> float | None:
    row = envelope_row(rows, bytes_ratio, split)
    return None if row is None else loss_kept(row, split)


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties averaged)."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def fmt_ci(m: dict, part: str = "") -> str:
    """``pooled [over sentences] [over adapters]``; ``part``: "_gainers" for the adapters that gain."""
    p, s_, a = m[f"pooled{part}"], m[f"ci_sentences{part}"], m[f"ci_adapters{part}"]
    return f"{p:.3f} [{s_[0]:.3f}, {s_[1]:.3f}] [{a[0]:.3f}, {a[1]:.3f}]"


def loss_kept(r: dict, split: str) -> float:
    """The figure settings are compared by: retained loss reduction over the adapters whose LoRA lowers
    the loss (see retained.py; over all adapters the LoRA's pooled gain is too small to divide by)."""
    return r["loss"][split]["pooled_gainers"]


def report_large(args) -> None:
    rows = load_rows()
    by = {r["setting"]: r for r in rows}
    if "base" not in by or "lora" not in by:
        raise SystemExit(f"{PARTS}: no base/lora rows; run '--collection large' first")
    with open(LARGE_MANIFEST, encoding="utf-8") as fh:
        manifest = json.load(fh)
    tasks = {t["name"]: t for t in manifest["tasks"]}
    large_metrics(rows, tasks)
    order = ("base", "lora", "budget", "svd", "full", "diag")
    rows.sort(key=lambda r: (order.index(r["method"]), bool(r.get("residual")), bool(r.get("calibration")),
                             r.get("ratio", 0), r.get("clusters", 0), r.get("rank", 0)))
    front = frontier(rows, "tune")
    reach = sorted((r for r in rows if r["method"] not in ("base", "lora") and loss_kept(r, "tune") >= 0.95),
                   key=lambda r: r["bytes_ratio"])
    for r in rows:  # the baselines' upper envelope at the bytes of each setting
        r["envelope"] = {split: None if r["method"] in ("base", "lora") else envelope_at(rows, r["bytes_ratio"], split)
                         for split in SPLITS}
    # The allocator against the best baseline within its bytes, paired on the same sentences.
    for r in rows:
        if r["method"] == "budget":
            r["vs_envelope"] = {}
            for split in SPLITS:
                env = envelope_row(rows, r["bytes_ratio"], split)
                if env is None:
                    continue
                names = retained_metric.gainers(by["base"]["ce"], by["lora"]["ce"],
                                                sorted(n for n in by["base"]["ce"] if tasks[n]["split"] == split),
                                                loss=True)
                r["vs_envelope"][split] = {"baseline": env["setting"], **retained_metric.difference(
                    by["base"]["ce"], by["lora"]["ce"], r["ce"], env["ce"], names, loss=True)}
                # What the residual representation adds: against the same budget without it.
                plain = by.get(label({"method": "budget", "ratio": r["ratio"]}))
                if r.get("residual") and not r.get("calibration") and plain is not None:
                    r.setdefault("vs_no_residual", {})[split] = retained_metric.difference(
                        by["base"]["ce"], by["lora"]["ce"], r["ce"], plain["ce"], names, loss=True)
                # What calibration adds: against the same budget chosen in the plain metric.
                plain = by.get(label({"method": "budget", "ratio": r["ratio"], "residual": True}))
                if r.get("calibration") and plain is not None:
                    r.setdefault("vs_plain_metric", {})[split] = retained_metric.difference(
                        by["base"]["ce"], by["lora"]["ce"], r["ce"], plain["ce"], names, loss=True)
    # The proxy is the plain relative error; a calibrated store's own adapters record the weighted one.
    compressed = [r for r in rows if r["method"] not in ("base", "lora") and not r.get("calibration")]
    proxy = {split: spearman([-r["mean_rel_error"] for r in compressed], [loss_kept(r, split) for r in compressed])
             for split in SPLITS}
    ce = {k: sum(sum(v) / len(v) for v in by[k]["ce"].values()) / len(by[k]["ce"]) for k in ("base", "lora")}
    acc = {k: sum(by[k]["accuracy"].values()) / len(by[k]["accuracy"]) for k in ("base", "lora")}
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores", "threads": 1,
        "torch": torch.__version__,
        "command": "python bench/bench_real_collection.py run --collection large [--shard I/N] "
                   "[--calibration STATS] && python bench/bench_real_collection.py report --collection large",
        "calibration_stats": "jdlora calibrate MINILM --text bench/real_collection/text/calibration.txt "
                             "--adapters (the first 7 adapters by name) --max-length 64 --batch-size 32 --threads 1 "
                             "--out STATS (18 modules, 27480 tokens; the budget's rows marked 'aware')",
        "adapters": {s: sum(t["split"] == s for t in tasks.values()) for s in SPLITS},
        "eval_sentences": sum(len(v) for v in by["base"]["ce"].values()),
        "original_bytes": by["lora"]["bytes"],
        "mean_ce": {k: round(v, 4) for k, v in ce.items()}, "mean_accuracy": {k: round(v, 4) for k, v in acc.items()},
        "collection_train_seconds": manifest["train_seconds"],
        "intervals": "95% percentile bootstrap, 1000 paired resamples: first over each adapter's eval sentences, "
                     "then over adapters",
        "proxy_spearman": {k: round(v, 4) for k, v in proxy.items()},
        "cheapest_at_0.95_on_tune": ({"setting": reach[0]["setting"], "bytes_ratio": round(reach[0]["bytes_ratio"], 4),
                                      "heldout": round(loss_kept(reach[0], "heldout"), 4)} if reach else None),
        "adapters_whose_lora_lowers_the_loss": {s: by["lora"]["loss"][s]["adapters_with_gain"] for s in SPLITS},
        "lora_loss_gain_nats": {s: round(by["lora"]["loss"][s]["lora_gain_mean"], 4) for s in SPLITS},
        "lora_accuracy_gain": {s: round(by["lora"]["acc"][s]["lora_gain_mean"], 4) for s in SPLITS},
    }
    keep = ("setting", "method", "rank", "clusters", "ratio", "residual", "calibration", "envelope", "vs_envelope",
            "vs_no_residual", "vs_plain_metric",
            "bytes", "bytes_ratio", "mean_rel_error", "max_rel_error",
            "compress_seconds", "seconds", "cli", "loss", "acc")
    stem = os.path.join(RESULTS, "real_collection_large")
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "rows": [{k: r[k] for k in keep if k in r} for r in rows]}, fh, indent=1)
    head = ["setting", "x original", "rel. error mean",
            "retained loss reduction, tune adapters that gain [sentences CI] [adapters CI]", "held-out",
            "all tune adapters", "retained accuracy, tune [CIs]", "held-out",
            "baselines' envelope at these bytes (tune, held-out)", "frontier"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["setting"], f"{r['bytes_ratio']:.4f}", f"{r['mean_rel_error']:.3f}",
            fmt_ci(r["loss"]["tune"], "_gainers"), fmt_ci(r["loss"]["heldout"], "_gainers"),
            f"{r['loss']['tune']['pooled']:.2f}", fmt_ci(r["acc"]["tune"]), fmt_ci(r["acc"]["heldout"]),
            " / ".join("-" if r["envelope"][x] is None else f"{r['envelope'][x]:.3f}" for x in SPLITS),
            "*" if r["setting"] in front else ""]) + " |")
    table = "\n".join(lines)
    vs = ["| budget | bytes | split | best baseline within these bytes | difference [95% CI, paired over sentences] |",
          "|---|---|---|---|---|"]
    for r in rows:
        for split, d in (r.get("vs_envelope") or {}).items():
            vs.append(f"| {r['setting']} | {r['bytes_ratio']:.4f} | {split} | {d['baseline']} | "
                      f"{d['difference']:+.3f} [{d['ci_sentences'][0]:+.3f}, {d['ci_sentences'][1]:+.3f}] |")
    table += "\n\nThe byte budget against the best baseline within its bytes (retained loss reduction over the " \
             "adapters that gain):\n\n" + "\n".join(vs)
    # The same budget with and without one thing, paired over sentences: residuals, then calibration.
    table += paired_table(rows, by, "vs_no_residual", "residuals", lambda r: {"method": "budget", "ratio": r["ratio"]},
                          "The byte budget with the residual representation against the same budget without it "
                          "(`--no-residual`)")
    table += paired_table(rows, by, "vs_plain_metric", "calibration",
                          lambda r: {"method": "budget", "ratio": r["ratio"], "residual": True},
                          "The byte budget with `--calibration` (activation-weighted errors) against the same "
                          "budget in the plain metric")
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write("# real_collection_large\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
                 + table + "\n")
    plot_large(rows, stem + ".png", front)
    print(table)
    print(f"-> {stem}.json/.md/.png")


def paired_table(rows: list[dict], by: dict, key: str, what: str, other, title: str) -> str:
    """A markdown section of the paired differences ``row[key]`` against the setting ``other(row)``; empty
    when no row has them."""
    lines = [f"| budget | bytes with / without {what} | split | difference [95% CI, paired over sentences] |",
             "|---|---|---|---|"]
    for r in rows:
        for split, d in (r.get(key) or {}).items():
            plain = by[label(other(r))]
            lines.append(f"| x{r['ratio']:g} | {r['bytes_ratio']:.4f} / {plain['bytes_ratio']:.4f} | {split} | "
                         f"{d['difference']:+.3f} [{d['ci_sentences'][0]:+.3f}, {d['ci_sentences'][1]:+.3f}] |")
    return f"\n\n{title}:\n\n" + "\n".join(lines) if len(lines) > 2 else ""


def plot_large(rows: list[dict], path: str, front: set[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    curves = [(f"JD-Full K={k}", lambda r, k=k: r["method"] == "full" and r["clusters"] == k, st)
              for k, st in ((1, "o-"), (4, "s-"), (8, "^-"), (16, "v-"), (32, "D-"))]
    curves += [(f"JD-Diag K={k}", lambda r, k=k: r["method"] == "diag" and r["clusters"] == k, st)
               for k, st in ((4, "s--"), (16, "v--"))]
    curves += [("per-adapter SVD r=1,2,4", lambda r: r["method"] == "svd", "kx-"),
               ("--target-ratio --no-residual", lambda r: r["method"] == "budget" and not r.get("residual"), "c*-"),
               ("--target-ratio (with residuals)", lambda r: r["method"] == "budget" and bool(r.get("residual"))
                and not r.get("calibration"), "mP-"),
               ("--target-ratio --calibration", lambda r: r["method"] == "budget" and bool(r.get("calibration")),
                "yX--")]
    for ax, split in zip(axes, SPLITS):
        for name, pick, style in curves:
            sel = sorted((r for r in rows if pick(r)), key=lambda r: r["bytes_ratio"])
            if sel:
                m = [r["loss"][split] for r in sel]
                err = [[x["pooled_gainers"] - x["ci_sentences_gainers"][0] for x in m],
                       [x["ci_sentences_gainers"][1] - x["pooled_gainers"] for x in m]]
                ax.errorbar([r["bytes_ratio"] for r in sel], [x["pooled_gainers"] for x in m], yerr=err, fmt=style,
                            label=name, capsize=2, ms=4)
        env = sorted((r for r in rows if r["setting"] in front), key=lambda r: r["bytes_ratio"])
        ax.plot([r["bytes_ratio"] for r in env], [loss_kept(r, split) for r in env], color="grey", lw=3,
                alpha=0.3, label="upper envelope (chosen on tune)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.axhline(0.95, color="red", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("store bytes / original adapter bytes")
        ax.set_title(f"{split}: the {rows[0]['loss'][split]['adapters_with_gain']} of "
                     f"{rows[0]['loss'][split]['adapters']} adapters whose LoRA lowers the loss", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("retained loss reduction (pooled; bars: 95% CI over eval sentences)")
    axes[0].set_ylim(0, 1.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args) -> None:
    if args.collection == "large":
        report_large(args)
        return
    rows = load_rows()
    by = {r["setting"]: r for r in rows}
    if "base" not in by or "lora" not in by:
        raise SystemExit(f"{PARTS}: no base/lora rows; run '--group grid' first")
    col_tasks = {}
    for n in by["base"]["accuracy"]:
        with open(os.path.join(ADAPTERS, n, "task.json"), encoding="utf-8") as fh:
            col_tasks[n] = {"family": json.load(fh)["family"]}
    base, lora = by["base"]["accuracy"], by["lora"]["accuracy"]
    for r in rows:
        r["retained"] = retained(r, base, lora, col_tasks)
    families = sorted({t["family"] for t in col_tasks.values()})
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "machine": f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores",
        "threads": 1, "torch": torch.__version__, "adapters": len(base), "eval_per_label": args.eval_per_label,
        "base_accuracy_mean": round(sum(base.values()) / len(base), 4),
        "lora_accuracy_mean": round(sum(lora.values()) / len(lora), 4),
        "original_bytes": by["lora"]["bytes"],
        "per_adapter_stats_over": f"{by['lora']['retained']['adapters_with_gain']} adapters with a LoRA gain >= "
                                  f"{MIN_GAIN} on the eval sentences",
        "lora_gain_per_family": {f: round(sum(lora[n] - base[n] for n in base if col_tasks[n]["family"] == f)
                                 / sum(col_tasks[n]["family"] == f for n in base), 4)
                                 for f in sorted({t["family"] for t in col_tasks.values()})},
    }
    report_quant(rows, col_tasks, meta, families)
    for group, stem in (("grid", "real_collection"), ("aware", "real_collection_aware")):
        order = ("base", "lora", "svd", "full", "diag")
        sel = sorted((r for r in rows if r["group"] == group),
                     key=lambda r: (order.index(r["method"]), budget_of(r) is not None,
                                    r.get("clusters", 0), r.get("rank", 0), budget_of(r) or 0))
        if not sel:
            continue
        if group == "aware":
            plain = {r["setting"]: r for r in rows if r["group"] == "grid"}
            sel = [x for r in sel for x in (plain.get(r["setting"].removesuffix(" aware")), r) if x]
        meta_g = {**meta, "command": f"python bench/bench_real_collection.py run --group {group}"
                  + (" --calibration STATS" if group == "aware" else "") + " && python bench/bench_real_collection.py report"}
        with open(os.path.join(RESULTS, stem + ".json"), "w", encoding="utf-8") as fh:
            json.dump({"meta": meta_g, "rows": sel}, fh, indent=1)
        with open(os.path.join(RESULTS, stem + ".md"), "w", encoding="utf-8") as fh:
            fh.write(f"# {stem}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta_g.items()) + "\n\n"
                     + md_table(sel, families) + "\n")
        if group == "grid":
            groups = [(f"JD-Full K={k}", lambda r, k=k: r["method"] == "full" and r["clusters"] == k
                       and budget_of(r) is None, style) for k, style in ((1, "o-"), (4, "s-"), (8, "^-"))]
            groups += [(f"JD-Diag K={k}", lambda r, k=k: r["method"] == "diag" and r["clusters"] == k, style)
                       for k, style in ((1, "o--"), (4, "s--"), (8, "^--"))]
            groups += [("per-adapter SVD r=1,2,4,8", lambda r: r["method"] == "svd", "kD-"),
                       ("JD-Full K=1 + error budget", lambda r: budget_of(r) is not None, "r*")]
            title = f"{len(base)} MiniLM LoRA adapters (r=8, q/k/v): retained benefit vs bytes"
        else:
            groups = [(f"{kind} K={k}", lambda r, k=k, a=aw: r["clusters"] == k and bool(r.get("calibration")) == a, st)
                      for k in (1, 4) for kind, aw, st in (("plain", False, "o-" if k == 1 else "s-"),
                                                           ("activation-aware", True, "o--" if k == 1 else "s--"))]
            title = "JD-Full r=8,16,32: plain vs activation-aware (equal bytes per pair)"
        plot(sel, os.path.join(RESULTS, stem + ".png"), title, groups)
        print(md_table(sel, families))
        print(f"-> {os.path.join(RESULTS, stem)}.json/.md/.png")


def report_quant(rows: list[dict], tasks: dict, meta: dict, families: list[str]) -> None:
    """The quant group: each quantized store against its float store (same commit, same run), by the retained
    loss reduction with its intervals and the paired difference, beside the pooled accuracy."""
    order = (None, "int8", "int4")
    sel = sorted((r for r in rows if r["group"] == "quant"),
                 key=lambda r: (r["method"] == "full", r.get("clusters", 0), r.get("rank", 0), order.index(r.get("quantize"))))
    by = {r["setting"]: r for r in sel}
    if "base" not in by or "lora" not in by:
        return
    base, lora = by["base"], by["lora"]
    names = sorted(base["ce"])
    for r in sel:
        r["retained"] = retained(r, base["accuracy"], lora["accuracy"], tasks)
        r["loss"] = retained_metric.retained(base["ce"], lora["ce"], r["ce"], names, loss=True)
    lines = ["| setting | store bytes | x original | bytes / float store | rel. error mean | retained loss reduction "
             "(gainers) [sentences] [adapters] | minus float [sentences] | retained accuracy pooled |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sel:
        if r["method"] != "full":
            continue
        float_row = by.get(r["setting"].removesuffix(" int8").removesuffix(" int4"))
        diff = "-"
        if r.get("quantize") and float_row:
            gain = retained_metric.gainers(base["ce"], lora["ce"], names, loss=True)
            d = retained_metric.difference(base["ce"], lora["ce"], r["ce"], float_row["ce"], gain, loss=True)
            r["loss_minus_float"] = d
            diff = f"{d['difference']:+.3f} [{d['ci_sentences'][0]:+.3f}, {d['ci_sentences'][1]:+.3f}]"
        lines.append(f"| {r['setting']} | {r['bytes']:,} | {r['bytes_ratio']:.3f} | "
                     f"{r['bytes'] / float_row['bytes'] if float_row else float('nan'):.2f} | "
                     f"{r['mean_rel_error']:.3f} | {fmt_ci(r['loss'], '_gainers')} | {diff} | "
                     f"{r['retained']['pooled']:.3f} |")
    meta_q = {**meta, "command": "python bench/bench_real_collection.py run --group quant && "
                                 "python bench/bench_real_collection.py report",
              "metric": "retained loss reduction over the adapters whose LoRA lowers the task loss by >= "
                        f"{retained_metric.MIN_LOSS_GAIN} nats, with 95% bootstrap intervals over sentences and over "
                        "adapters; 'minus float' pairs each quantized store with its float store on the same draws"}
    stem = os.path.join(RESULTS, "real_collection_quant")
    with open(stem + ".json", "w", encoding="utf-8") as fh:
        json.dump({"meta": meta_q, "rows": sel}, fh, indent=1)
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write("# real_collection_quant\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta_q.items()) + "\n\n"
                 + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for q, marker, ls in ((None, "o", "-"), ("int8", "s", "--"), ("int4", "^", ":")):
        pts = sorted((r["bytes_ratio"], r["loss"]["pooled_gainers"], r["loss"]["ci_sentences_gainers"]) for r in sel
                     if r["method"] == "full" and r.get("quantize") == q)
        if not pts:
            continue
        bar = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], fmt=marker, capsize=2,
                          yerr=[[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]],
                          label=f"JD-Full, {q or 'float'} bases (line: best within the bytes)")
        best = [p for p in pts if not any(o[0] <= p[0] and o[1] > p[1] for o in pts)]
        ax.plot([p[0] for p in best], [p[1] for p in best], ls, color=bar[0].get_color())
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes / original adapter bytes")
    ax.set_ylabel("retained loss reduction (adapters that gain), 95% CI over sentences")
    ax.set_title(f"{len(names)} MiniLM LoRA adapters: float, int8 and int4 bases (r=8,16,32; K=1,4)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))
    print(f"-> {stem}.json/.md/.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compress, export and evaluate the settings of a group")
    r.add_argument("--group", choices=["grid", "aware", "quant"], default="grid",
                   help="settings of the small collection")
    r.add_argument("--calibration", default=None, metavar="STATS",
                   help="stats of 'jdlora calibrate' (group aware; with --collection large, the calibrated budget)")
    r.add_argument("--shard", default="0/1", help="I/N: run every N-th setting from the I-th (N processes at once)")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="merge the runs into JSON, markdown and PNG under bench/results")
    rep.set_defaults(func=cmd_report)
    for sp in (r, rep):
        sp.add_argument("--eval-per-label", type=int, default=None,
                        help="eval sentences per label and task (default: 20 for the small collection, all for the "
                             "large one)")
        sp.add_argument("--collection", choices=sorted(COLLECTIONS), default="small",
                        help="small: the 32 committed adapters; large: the 220 of make_collection.py train --large")
    args = p.parse_args(argv)
    use_collection(args.collection)
    if args.collection == "large":
        args.group = "large"
    elif args.eval_per_label is None:
        args.eval_per_label = 20
    args.func(args)


if __name__ == "__main__":
    main()
