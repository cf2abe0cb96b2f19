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
import hashlib
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
from jdlora_ops.store import file_sha256  # noqa: E402

TEXT = os.path.join(HERE, "text", "sentences.jsonl")
CALIB = os.path.join(HERE, "text", "calibration.txt")
ADAPTERS = os.path.join(HERE, "adapters")
MANIFEST = os.path.join(HERE, "collection.json")
LARGE_ADAPTERS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "build", "real_collection_large")
LARGE_MANIFEST = os.path.join(HERE, "collection_large.json")
# Tens of seconds per adapter on one core: fewer training sentences, more eval sentences (eval is
# what the benchmark's metric rests on).
LARGE_DEFAULTS = {"max_train": 64, "max_eval": 60, "epochs": 3, "lr": 3e-3, "l2": 1e-2}


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


def usable_labels(text: dict, min_train: int) -> dict[str, list[str]]:
    """family -> its labels with at least ``min_train`` training sentences."""
    out: dict = {}
    for f, lab, s in sorted(text):
        if s == "train" and len(text[(f, lab, s)]) >= min_train:
            out.setdefault(f, []).append(lab)
    return out


def make_tasks_large(text: dict, count: int, min_train: int, seed: int) -> list[dict]:
    """Every 2-, 3- and 4-label subset of each family, then pairs of labels of two families up to ``count``.

    The within-family tasks come in families of related tasks (they share labels and text); the
    cross-family pairs (family ``mixed``, labels ``family/label``) are easier and unrelated to each
    other, so the collection holds both kinds a platform sees.
    """
    rng = random.Random(seed)
    labels = usable_labels(text, min_train)
    tasks = []
    for family, labs in labels.items():
        for way in (2, 3, 4):
            for subset in itertools.combinations(labs, way):
                tasks.append({"name": f"{family}-" + "-".join(subset), "family": family, "labels": list(subset)})
    qualified = [f"{f}/{lab}" for f, labs in labels.items() for lab in labs]
    pairs = [p for p in itertools.combinations(qualified, 2) if p[0].split("/")[0] != p[1].split("/")[0]]
    for pair in sorted(rng.sample(pairs, max(0, min(count - len(tasks), len(pairs))))):
        tasks.append({"name": "mixed-" + "-".join(x.replace("/", "_") for x in pair), "family": "mixed",
                      "labels": list(pair)})
    if len(tasks) < count:
        raise SystemExit(f"--count {count}: the text makes only {len(tasks)} tasks")
    return tasks[:count]


def heldout(name: str, fraction: float) -> bool:
    """Whether a task is in the held-out split: a hash of its name, so that no choice of ours decides it."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) < fraction * 16 ** 8


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
    per = [text.get((*lab.split("/"), split) if "/" in lab else (task["family"], lab, split), [])
           for lab in task["labels"]]
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
    normalise_config(cfg)
    with open(cpath, "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              os.path.join(out, minilm.HEAD_FILE))
    with open(os.path.join(out, "task.json"), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)


def normalise_config(cfg: dict) -> dict:
    """PEFT keeps target_modules as a set, written in the order of this process's string hashing:
    sorted here, so that the file is the same in every run."""
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def reload_factors(path: str) -> dict:
    """module -> (A, B, scale) of a PEFT adapter, read with the project's reader."""
    from jdlora_ops.peft_io import read_peft_adapter

    ad = read_peft_adapter(path)
    return {m: ad.load(m) for m in ad.modules}


def train_task(text: dict, task: dict, k: int, args, base, tok, out: str) -> dict:
    """Fit the head, train and save the adapter of one task; its task.json info (deterministic for the seed)."""
    rng = random.Random(f"{args.seed}/{task['name']}")
    tr_x, tr_y = task_split(text, task, "train", args.max_train, rng)
    ev_x, ev_y = task_split(text, task, "eval", args.max_eval, rng)
    # The head sees every other training sentence: fitted on all of them it separates them
    # perfectly and leaves the adapter nothing to learn.
    head = fit_head(minilm.embed(base, tok, tr_x[::2]), tr_y[::2], len(task["labels"]), args.l2)
    base_acc = minilm.accuracy(base, tok, head, ev_x, ev_y)
    model, _ = train_lora(tr_x, tr_y, head, args, seed=args.seed * 1000 + k)
    info = {**task, "train_sentences": len(tr_x), "eval_sentences": len(ev_x), "base_acc": base_acc}
    if not args.large:  # the large collection skips it for time: the float16 file is what is measured
        info["lora_acc_fp32"] = minilm.accuracy(model, tok, head, ev_x, ev_y)
    info.update(eval_texts=ev_x, eval_labels=ev_y.tolist())
    save_adapter(model, head, out, info)
    with minilm.MergedAdapter(base, reload_factors(out)):
        info["lora_acc"] = minilm.accuracy(base, tok, head, ev_x, ev_y)
    return info


def collection_paths(args) -> tuple[str, str]:
    """(adapters folder, manifest path) of the collection the arguments name."""
    if args.large:
        return os.path.abspath(args.out or LARGE_ADAPTERS), LARGE_MANIFEST
    return os.path.abspath(args.out or ADAPTERS), MANIFEST


def collection_tasks(args) -> list[dict]:
    text = load_text()
    if args.large:
        tasks = make_tasks_large(text, args.count, args.min_train, args.seed)
        for t in tasks:
            t["split"] = "heldout" if heldout(t["name"], args.heldout) else "tune"
        return tasks
    return make_tasks(text, args.per_family, args.way, args.min_train, args.seed)


def cmd_train(args) -> None:
    torch.set_num_threads(1)
    text = load_text()
    tasks = collection_tasks(args)
    folder, manifest = collection_paths(args)
    i_shard, n_shard = map(int, args.shard.split("/"))
    todo = [t for k, t in enumerate(tasks) if k % n_shard == i_shard and (not args.only or t["name"] in args.only)]
    os.makedirs(folder, exist_ok=True)
    base, tok = minilm.load_base()
    t_all = time.time()
    for task in todo:
        k = tasks.index(task)
        out = os.path.join(folder, task["name"])
        if args.resume and os.path.isfile(os.path.join(out, "task.json")):
            continue
        t0 = time.time()
        info = train_task(text, task, k, args, base, tok, out)
        seconds = round(time.time() - t0, 1)
        if args.large:  # kept apart so that task.json is the same file in every run
            with open(os.path.join(out, "timing.json"), "w", encoding="utf-8") as fh:
                json.dump({"seconds": seconds}, fh)
        else:
            info["seconds"] = seconds
        tmp = os.path.join(out, "task.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:  # written last: its presence marks a finished task
            json.dump(info, fh, indent=2)
        os.replace(tmp, os.path.join(out, "task.json"))
        print(f"[{k + 1}/{len(tasks)}] {task['name']}: train {info['train_sentences']} eval {info['eval_sentences']} "
              f"base {info['base_acc']:.3f} lora {info['lora_acc']:.3f} {seconds} s", flush=True)
    write_manifest(tasks, args, folder, manifest, time.time() - t_all)


HASHED = ("adapter_config.json", "adapter_model.safetensors", minilm.HEAD_FILE, "task.json")


def write_manifest(tasks: list[dict], args, folder: str, path: str, seconds: float) -> None:
    """The manifest from every task's task.json, once all tasks are trained (by any shard)."""
    rows = []
    for task in tasks:
        tdir = os.path.join(folder, task["name"])
        if not os.path.isfile(os.path.join(tdir, "task.json")):
            print(f"{task['name']} is not trained yet; the manifest is written when every task is")
            return
        with open(os.path.join(tdir, "task.json"), encoding="utf-8") as fh:
            row = {k: v for k, v in json.load(fh).items() if k not in ("eval_texts", "eval_labels")}
        if args.large:
            with open(os.path.join(tdir, "timing.json"), encoding="utf-8") as fh:
                row["seconds"] = json.load(fh)["seconds"]
            row["sha256"] = {f: file_sha256(os.path.join(tdir, f)) for f in HASHED}
        rows.append(row)
    manifest = {
        "base_model": minilm.BASE_MODEL, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "only", "shard", "out", "resume")},
        "train_seconds": round(sum(r["seconds"] for r in rows), 1), "tasks": rows,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2)
    gains = [r["lora_acc"] - r["base_acc"] for r in rows]
    print(f"{len(rows)} adapters ({manifest['train_seconds']} s of training, last shard {seconds:.0f} s); "
          f"accuracy gain mean {sum(gains) / len(gains):+.3f}, min {min(gains):+.3f} -> {path}")


def cmd_verify(args) -> None:
    """Check a built large collection file by file against the committed manifest's SHA-256."""
    folder, path = collection_paths(args)
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    tasks = [t for t in manifest["tasks"] if not args.only or t["name"] in args.only]
    if args.only and len(tasks) != len(set(args.only)):
        raise SystemExit(f"--only: not in {path}: {sorted(set(args.only) - {t['name'] for t in tasks})}")
    bad = [f"{t['name']}/{f}" for t in tasks for f, digest in t["sha256"].items()
           if not os.path.isfile(os.path.join(folder, t["name"], f))
           or file_sha256(os.path.join(folder, t["name"], f)) != digest]
    if bad:
        raise SystemExit(f"{len(bad)} files differ from {path} (or are missing), e.g. {bad[:3]}")
    print(f"{len(tasks)} adapters in {folder} match {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("extract", help="extract the docstring text").set_defaults(func=cmd_extract)
    t = sub.add_parser("train", help="train the adapters and heads")
    t.add_argument("--large", action="store_true",
                   help="the large collection (every within-family task and cross-family pairs, --count of them, "
                        "shorter training; built outside the repository, checked by its committed manifest)")
    t.add_argument("--count", type=int, default=220, help="tasks of the large collection")
    t.add_argument("--heldout", type=float, default=0.25, help="share of the large collection held out")
    t.add_argument("--out", default=None, help="adapters folder (default: adapters/, or build/real_collection_large)")
    t.add_argument("--resume", action="store_true", help="skip tasks whose task.json exists")
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
    v = sub.add_parser("verify", help="check a built large collection against collection_large.json")
    v.add_argument("--out", default=None)
    v.add_argument("--only", nargs="+", default=None, help="check these tasks only (a partial rebuild)")
    v.set_defaults(func=cmd_verify, large=True)
    args = p.parse_args(argv)
    if args.cmd == "train" and args.large:  # shorter training for the large collection unless given
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for opt, value in LARGE_DEFAULTS.items():
            if "--" + opt.replace("_", "-") not in given:
                setattr(args, opt, value)
    args.func(args)


if __name__ == "__main__":
    main()
