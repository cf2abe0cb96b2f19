"""The real-collection benchmark's retained-benefit metric and its bootstrap intervals (bench/real_collection/retained.py)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "real_collection"))
from retained import retained  # noqa: E402


def _collection(seed: int, n: int = 40, sentences: int = 60, gain: float = 0.3, noise: float = 0.5):
    rng = np.random.default_rng(seed)
    names = [f"a{i}" for i in range(n)]
    base = {k: 1.0 + noise * rng.random(sentences + i % 7) for i, k in enumerate(names)}
    lora = {k: v - gain - 0.1 * noise * rng.standard_normal(len(v)) for k, v in base.items()}
    return names, base, lora


def test_lossless_keeps_one_and_base_keeps_zero():
    names, base, lora = _collection(0)
    assert retained(base, lora, lora, names, loss=True)["pooled"] == pytest.approx(1.0)
    assert retained(base, lora, base, names, loss=True)["pooled"] == pytest.approx(0.0)


def test_half_way_is_one_half_with_intervals_around_it():
    names, base, lora = _collection(1)
    half = {k: (base[k] + lora[k]) / 2 for k in names}
    rng = np.random.default_rng(2)
    noisy = {k: v + 0.05 * rng.standard_normal(len(v)) for k, v in half.items()}
    out = retained(base, lora, noisy, names, loss=True, n_boot=500)
    assert out["pooled"] == pytest.approx(0.5, abs=0.05)
    for key in ("ci_sentences", "ci_adapters"):
        lo, hi = out[key]
        assert lo < out["pooled"] < hi and hi - lo < 0.2
    assert out["adapters_with_gain"] == len(names)
    assert out["per_adapter_p10"] <= out["per_adapter_mean"]


def test_more_noise_widens_the_sentence_interval():
    names, base, lora = _collection(3)
    rng = np.random.default_rng(4)
    widths = []
    for noise in (0.02, 0.3):
        comp = {k: lora[k] + 0.1 + noise * rng.standard_normal(len(lora[k])) for k in names}
        lo, hi = retained(base, lora, comp, names, loss=True, n_boot=400)["ci_sentences"]
        widths.append(hi - lo)
    assert widths[1] > 2 * widths[0]


def test_accuracy_counts_gains_upwards():
    names = ["x", "y"]
    base = {"x": [0, 0, 1, 1], "y": [1, 0, 0, 0]}
    lora = {"x": [1, 1, 1, 1], "y": [1, 1, 1, 0]}
    comp = {"x": [1, 0, 1, 1], "y": [1, 1, 0, 0]}
    assert retained(base, lora, comp, names, loss=False)["pooled"] == pytest.approx((0.25 + 0.25) / (0.5 + 0.5))


def test_mismatched_sentences_are_refused_by_name():
    with pytest.raises(ValueError, match=r"b: expected the same non-zero number of sentences.*got 2, 2, 1"):
        retained({"b": [1.0, 2.0]}, {"b": [0.5, 1.0]}, {"b": [1.0]}, ["b"], loss=True)
    with pytest.raises(ValueError, match="names: expected at least one adapter"):
        retained({}, {}, {}, [], loss=True)


def test_gainers_pool_ignores_adapters_without_a_benefit():
    names, base, lora = _collection(5, n=20)
    flat = {f"z{i}": base["a0"] * 0 + 1.0 for i in range(5)}  # LoRA = base: no benefit to keep
    base.update(flat)
    lora.update({k: v - 0.001 for k, v in flat.items()})
    half = {k: (base[k] + lora[k]) / 2 for k in base}
    for k in flat:  # the compressed ones happen to do better than the LoRA there
        half[k] = flat[k] - 0.2
    out = retained(base, lora, half, sorted(base), loss=True, n_boot=300)
    assert out["pooled"] > 0.6  # the flat adapters move the pool off 0.5
    assert out["adapters_with_gain"] == 20
    assert out["pooled_gainers"] == pytest.approx(0.5, abs=1e-9)
    lo, hi = out["ci_adapters_gainers"]
    assert lo <= 0.5 <= hi


def test_paired_difference_resolves_a_small_consistent_edge():
    from retained import difference

    names, base, lora = _collection(6)
    rng = np.random.default_rng(7)
    a = {k: (base[k] + lora[k]) / 2 + 0.05 * rng.standard_normal(len(base[k])) for k in names}
    b = {k: v + 0.01 for k, v in a.items()}  # a little worse everywhere
    d = difference(base, lora, a, b, names, loss=True, n_boot=400)
    assert d["difference"] == pytest.approx(0.01 / 0.3, rel=0.05)
    lo, hi = d["ci_sentences"]
    assert 0 < lo < d["difference"] < hi  # a consistent small edge is resolved
