"""The main job, ``jdlora demo``, in a small fast configuration (synthetic and real PEFT adapters)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from jdlora_ops import demo  # noqa: E402

TINY = [
    "--num-adapters", "24", "--layers", "1", "--hidden", "64", "--kv-width", "32", "--head-dim", "16",
    "--intermediate", "96", "--vocab", "101", "--clusters", "3", "--rank", "8", "--adapter-rank", "4",
    "--batch", "6", "--prompt", "5", "--decode", "2", "--rounds", "2", "--warmup", "1", "--threads", "1",
    "--max-rounds", "2", "--max-iter", "10", "--no-progress",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def check_result(out_dir, tag, n):
    with open(os.path.join(out_dir, tag + ".json")) as fh:
        res = json.load(fh)
    assert [r["variant"] for r in res["rows"]] == ["a", "b", "c", "d"]
    for r in res["rows"]:
        assert r["tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    a, b, c, d = res["rows"]
    assert b["vs_one_adapter"] == pytest.approx(1.0)
    assert c["vs_one_adapter"] == pytest.approx(c["tokens_per_s"] / b["tokens_per_s"])
    assert set(res["bars"]) == {"compressed_vs_one_adapter", "compressed_keeps_80pct",
                                "compressed_vs_uncompressed", "compressed_faster_than_uncompressed"}
    assert res["adapters"]["count"] == n and res["threads"] == 1
    comp = res["compression"]
    assert 0 <= comp["mean_rel_error"] <= comp["max_rel_error"] <= 1
    assert comp["memory"]["bytes_after"] < comp["memory"]["bytes_before"]
    assert math.isfinite(res["output_error"]["relative"]) and res["output_error"]["relative"] > 0
    # (d) swaps: fewer device slots than adapters, and adapters were copied in during the stream.
    assert res["device_budget"]["uncompressed_slots"] < n
    assert d["adapter_misses"] > 0 and d["host_to_device_mib"] > 0
    md = open(os.path.join(out_dir, tag + ".md")).read()
    assert "(c) / (b) =" in md and "| (d)" in md
    return res


def test_demo_synthetic(tmp_path, capsys):
    assert demo.main(TINY + ["--out", str(tmp_path), "--tag", "tiny"]) == 0
    res = check_result(tmp_path, "tiny", 24)
    assert os.path.getsize(tmp_path / "tiny.png") > 1000
    out = capsys.readouterr().out
    assert "reconstruction error" in out and "tokens/s" in out and "(c) / (b)" in out
    assert res["commit"] is None or len(res["commit"]) == 40


def test_demo_with_peft_adapters(tmp_path):
    from jdlora_ops.synthetic import SyntheticCollection, SyntheticSpec, llama_like_modules, write_peft_adapters

    mods = llama_like_modules(2, 48, 24, ("q_proj", "v_proj"))
    col = SyntheticCollection(SyntheticSpec(num_adapters=10, modules=mods, ranks=(2, 4), seed=4))
    paths = write_peft_adapters(col, tmp_path / "adapters")
    argv = ["--adapters", *paths, "--clusters", "2", "--rank", "6", "--batch", "5", "--prompt", "4", "--decode", "2",
            "--rounds", "1", "--threads", "1", "--vocab", "50", "--max-rounds", "2", "--max-iter", "10",
            "--no-progress", "--no-plot", "--out", str(tmp_path / "out")]
    assert demo.main(argv) == 0
    res = check_result(tmp_path / "out", "demo", 10)
    # The model's shapes come from the adapters: 2 layers, hidden 48, k/v width 24.
    assert res["model"]["layers"] == 2 and res["model"]["hidden"] == 48
    assert res["model"]["kv_heads"] * 48 // res["model"]["heads"] == 24
    assert not os.path.exists(tmp_path / "out" / "demo.png")


def test_demo_entry_points():
    from jdlora_ops import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    assert demo.main(["--rounds", "0"]) == 2
    r = subprocess.run([sys.executable, "-m", "jdlora_ops.demo", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--adapters" in r.stdout
