"""Generate the real adapter collection: LoRA adapters of all-MiniLM-L6-v2 trained on real text.

    python bench/real_collection/make_collection.py extract   # docstring text -> text/sentences.jsonl
    python bench/real_collection/make_collection.py train     # adapters/<task>/ and collection.json

Text (``text_source.py``): sentences of the docstrings of Python standard
library and numpy modules, labelled by module group, in five families
(files, network, concurrency, numeric, text). A task tells two module groups
of one family apart (binary, balanced). Every sentence has one split for all
tasks: train / eval / calib (``calibration.txt``, for ``jdlora calibrate``).

Per task (deterministic for ``--seed``; one torch thread):

1. the head: L2-regularised logistic regression (``[2, 384]`` + bias) on the
   base model's mean-pooled embeddings of every other training sentence of
   the task (fitted on all of them it separates them perfectly, and the
   adapter then has no training error left to learn from); its eval
   accuracy is the base accuracy;
2. the adapter: PEFT LoRA, r = 8, alpha = 16, on query/key/value of all 6
   layers, trained on all the task's training sentences with the head frozen
   (cross-entropy, AdamW), so the whole gain over the base comes from the adapter;
3. saved with ``save_pretrained`` (safetensors), factors cast to float16; the
   head as ``head.safetensors`` beside them (uncompressed, like PEFT's
   ``modules_to_save``); the float16 adapter is re-read with the project's
   PEFT reader and evaluated again: that is the recorded LoRA accuracy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import minilm  # noqa: E402
import text_source  # noqa: E402

TEXT = os.path.join(HERE, "text", "sentences.jsonl")
CALIB = os.path.join(HERE, "text", "calibration.txt")
ADAPTERS = os.path.join(HERE, "adapters")
MANIFEST = os.path.join(HERE, "collection.json")


def cmd_extract(args) -> None:
    rows = text_source.extract()
    os.makedirs(os.path.dirname(TEXT), exist_ok=True)
    with open(TEXT, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(CALIB, "w", encoding="utf-8") as fh:
        fh.write("\n\n".join(r["text"] for r in rows if r["split"] == "calib") + "\n")
    counts: dict = {}
    for r in rows:
        counts.setdefault(f"{r['family']}/{r['label']}", {}).setdefault(r["split"], 0)
        counts[f"{r['family']}/{r['label']}"][r["split"]] += 1
    for k, v in counts.items():
        print(f"{k:32s} " + " ".join(f"{s} {v.get(s, 0):4d}" for s in text_source.SPLITS))
    print(f"{len(rows)} sentences (Python {platform.python_version()}) -> {TEXT}, {CALIB}")


def load_text() -> dict:
    """(family, label, split) -> sorted sentences."""
    if not os.path.isfile(TEXT):
        raise SystemExit(f"{TEXT} is missing: run '{sys.argv[0]} extract' first")
    out: dict = {}
    with open(TEXT, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            out.setdefault((r["family"], r["label"], r["split"]), []).append(r["text"])
    return out


def make_tasks(text: dict, per_family: int, way: int, min_train: int, seed: int) -> list[dict]:
    """``per_family`` ``way``-label subsets of each family, drawn with ``seed`` among labels with enough training text."""
    rng = random.Random(seed)
    tasks = []
    for family in sorted({f for f, _, _ in text}):
        labels = sorted({lab for f, lab, s in text if f == family and len(text[(f, lab, "train")]) >= min_train})
        subsets = list(itertools.combinations(labels, way))
        for subset in sorted(rng.sample(subsets, min(per_family, len(subsets)))):
            tasks.append({"name": f"{family}-" + "-".join(subset), "family": family, "labels": list(subset)})
    return tasks


def task_split(text: dict, task: dict, split: str, cap: int, rng: random.Random) -> tuple[list[str], torch.Tensor]:
    """Balanced sentences of the task's labels (at most ``cap`` each) and their label ids."""
    per = [text.get((task["family"], lab, split), []) for lab in task["labels"]]
    n = min(cap, *map(len, per))
    texts, labels = [], []
    for i, sents in enumerate(per):
        texts += rng.sample(sents, n)
        labels += [i] * n
    return texts, torch.tensor(labels)


def fit_head(emb: torch.Tensor, labels: torch.Tensor, num_labels: int, l2: float) -> torch.nn.Linear:
    """L2-regularised multinomial logistic regression by L-BFGS (deterministic)."""
    head = torch.nn.Linear(emb.shape[1], num_labels)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(emb), labels) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.requires_grad_(False)


def train_lora(texts, labels, head, args, seed: int):
    """A PEFT LoRA model of a fresh base model, trained with the frozen head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base, tok = minilm.load_base()
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=minilm.TARGET_MODULES, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.epochs):
        perm = torch.randperm(len(texts), generator=gen).tolist()
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=minilm.MAX_LENGTH)
            loss = torch.nn.functional.cross_entropy(head(minilm.mean_pool(model, enc)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), tok


def save_adapter(model, head, out: str, info: dict) -> None:
    """``save_pretrained`` (safetensors), factors cast to float16, head and task info beside them."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(out, safe_serialization=True)
    card = os.path.join(out, "README.md")  # PEFT's template model card, naming this machine's model folder
    if os.path.isfile(card):
        os.remove(card)
    wpath = os.path.join(out, "adapter_model.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(wpath).items()}, wpath,
              metadata={"format": "pt"})
    cpath = os.path.join(out, "adapter_config.json")
    with open(cpath, encoding="utf-8") as fh:
        cfg = json.load(fh)
    cfg["base_model_name_or_path"] = minilm.BASE_MODEL  # not this machine's folder
    with open(cpath, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              os.path.join(out, minilm.HEAD_FILE))
    with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)


def reload_factors(path: str) -> dict:
    """module -> (A, B, scale) of a PEFT adapter, read with the project's reader."""
    from jdlora_ops.peft_io import read_peft_adapter

    ad = read_peft_adapter(path)
    return {m: ad.load(m) for m in ad.modules}


def cmd_train(args) -> None:
    torch.set_num_threads(1)
    text = load_text()
    tasks = make_tasks(text, args.per_family, args.way, args.min_train, args.seed)
    i_shard, n_shard = map(int, args.shard.split("/"))
    todo = [t for k, t in enumerate(tasks) if k % n_shard == i_shard and (not args.only or t["name"] in args.only)]
    os.makedirs(ADAPTERS, exist_ok=True)
    base, tok = minilm.load_base()
    t_all = time.time()
    for task in todo:
        k = tasks.index(task)
        t0 = time.time()
        rng = random.Random(f"{args.seed}/{task['name']}")
        tr_x, tr_y = task_split(text, task, "train", args.max_train, rng)
        ev_x, ev_y = task_split(text, task, "eval", args.max_eval, rng)
        # The head sees every other training sentence: fitted on all of them it separates them
        # perfectly and leaves the adapter nothing to learn.
        head = fit_head(minilm.embed(base, tok, tr_x[::2]), tr_y[::2], len(task["labels"]), args.l2)
        base_acc = minilm.accuracy(base, tok, head, ev_x, ev_y)
        model, _ = train_lora(tr_x, tr_y, head, args, seed=args.seed * 1000 + k)
        lora_acc_fp32 = minilm.accuracy(model, tok, head, ev_x, ev_y)
        out = os.path.join(ADAPTERS, task["name"])
        info = {**task, "train_sentences": len(tr_x), "eval_sentences": len(ev_x), "base_acc": base_acc,
                "lora_acc_fp32": lora_acc_fp32, "eval_texts": ev_x, "eval_labels": ev_y.tolist()}
        save_adapter(model, head, out, info)
        with minilm.MergedAdapter(base, reload_factors(out)):
            info["lora_acc"] = minilm.accuracy(base, tok, head, ev_x, ev_y)
        info["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        print(f"[{k + 1}/{len(tasks)}] {task['name']}: train {len(tr_x)} eval {len(ev_x)} base {base_acc:.3f} "
              f"lora {info['lora_acc']:.3f} (fp32 {lora_acc_fp32:.3f}) {info['seconds']} s", flush=True)
    write_manifest(tasks, args, time.time() - t_all)


def write_manifest(tasks: list[dict], args, seconds: float) -> None:
    """collection.json from every task's task.json, once all tasks are trained (by any shard)."""
    rows = []
    for task in tasks:
        path = os.path.join(ADAPTERS, task["name"], "task.json")
        if not os.path.isfile(path):
            print(f"{task['name']} is not trained yet; collection.json is written when every task is")
            return
        with open(path, encoding="utf-8") as fh:
            rows.append({k: v for k, v in json.load(fh).items() if k not in ("eval_texts", "eval_labels")})
    manifest = {
        "base_model": minilm.BASE_MODEL, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "only", "shard")},
        "train_seconds": round(sum(r["seconds"] for r in rows), 1), "tasks": rows,
    }
    with open(MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    gains = [r["lora_acc"] - r["base_acc"] for r in rows]
    print(f"{len(rows)} adapters ({manifest['train_seconds']} s of training, last shard {seconds:.0f} s); "
          f"accuracy gain mean {sum(gains) / len(gains):+.3f}, min {min(gains):+.3f} -> {MANIFEST}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("extract", help="extract the docstring text").set_defaults(func=cmd_extract)
    t = sub.add_parser("train", help="train the adapters and heads")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--per-family", type=int, default=7, help="tasks (label subsets) per family")
    t.add_argument("--way", type=int, default=3, help="labels per task")
    t.add_argument("--min-train", type=int, default=45, help="training sentences a label needs")
    t.add_argument("--max-train", type=int, default=100, help="training sentences per label, at most")
    t.add_argument("--max-eval", type=int, default=80, help="eval sentences per label, at most")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--l2", type=float, default=1e-3, help="L2 weight of the head's logistic regression")
    t.add_argument("--shard", default="0/1", help="I/N: train every N-th task from the I-th (run N at once)")
    t.add_argument("--only", nargs="+", default=None, help="train these tasks only")
    t.set_defaults(func=cmd_train)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
