"""Retained task benefit of compressed adapters, with bootstrap confidence intervals.

For adapter ``n`` with eval sentences ``s`` and a per-sentence score ``x`` (the
task head's cross-entropy, or 0/1 correctness), the benefit of a model is its
mean score's improvement over the base model's on the same sentences. The
pooled retained benefit of a compression setting is

    sum_n (mean_s base[n] - mean_s comp[n]) / sum_n (mean_s base[n] - mean_s lora[n])

for the loss (signs flipped for accuracy): every adapter weighs the same,
whatever its number of eval sentences. 1 means the compressed adapters do
what the originals do; 0 means they do what no adapter does.

The same figures over the adapters whose LoRA improves the metric by a margin
(``*_gainers``; selected on the LoRA against the base, the same for every
setting) are the ones to read when the LoRA's pooled gain is small: a pool
with a denominator near zero says nothing.

Two percentile intervals, from paired resamples (the base, LoRA and
compressed scores of a sentence or an adapter are drawn together):

- over sentences: each adapter's eval sentences are resampled, the adapters
  kept; the noise of a finite eval set, i.e. whether two settings measured on
  these adapters differ;
- over adapters: the adapters are resampled, each with all its sentences; how
  far the figure would move for another collection drawn like this one.
"""

from __future__ import annotations

import numpy as np

MIN_LOSS_GAIN = 0.02  # nats: per-adapter ratios only where the adapter lowers the loss this much


def _arrays(scores: dict, names: list[str]) -> list[np.ndarray]:
    return [np.asarray(scores[n], dtype=np.float64) for n in names]


def gainers(base: dict, lora: dict, names: list[str], *, loss: bool) -> list[str]:
    """The adapters whose LoRA improves the metric by the margin (``MIN_LOSS_GAIN`` nats, or 5 accuracy points)."""
    sign, threshold = (-1.0, MIN_LOSS_GAIN) if loss else (1.0, 0.05)
    return [n for n in names if sign * (np.mean(lora[n]) - np.mean(base[n])) >= threshold]


def retained(base: dict, lora: dict, comp: dict, names: list[str], *, loss: bool, n_boot: int = 1000,
             seed: int = 0) -> dict:
    """Pooled retained benefit and its two 95% intervals; per-adapter ratios for the adapters that gain.

    ``base``, ``lora``, ``comp``: adapter name -> per-sentence scores, the same sentences in the
    same order in all three. ``loss``: the scores are losses (lower is better).
    """
    if not names:
        raise ValueError("names: expected at least one adapter, got none")
    sign = -1.0 if loss else 1.0
    b, l, c = _arrays(base, names), _arrays(lora, names), _arrays(comp, names)
    for n, x, y, z in zip(names, b, l, c):
        if not (len(x) == len(y) == len(z) > 0):
            raise ValueError(f"{n}: expected the same non-zero number of sentences in base, lora and comp, "
                             f"got {len(x)}, {len(y)}, {len(z)}")
    gain_l = np.array([sign * (y.mean() - x.mean()) for x, y in zip(b, l)])
    gain_c = np.array([sign * (z.mean() - x.mean()) for x, z in zip(b, c)])
    out = {"adapters": len(names), "lora_gain_mean": float(gain_l.mean()), "comp_gain_mean": float(gain_c.mean())}
    out.update(_pooled(b, l, c, np.arange(len(names)), gain_l, gain_c, sign, n_boot, seed))

    # An adapter whose LoRA barely moves the metric carries no benefit to keep, and a pool of them
    # has a denominator near zero: the same figures over the adapters that gain (chosen by the
    # LoRA against the base only, never by a compressed setting).
    chosen = set(gainers(base, lora, names, loss=loss))
    keep = np.array([i for i, n in enumerate(names) if n in chosen], dtype=np.int64)
    out["adapters_with_gain"] = int(len(keep))
    if len(keep):
        sel = _pooled(b, l, c, keep, gain_l, gain_c, sign, n_boot, seed)
        out.update({f"{k}_gainers": v for k, v in sel.items()})
        ratios = gain_c[keep] / gain_l[keep]
        out.update(per_adapter_mean=float(ratios.mean()), per_adapter_p10=float(np.percentile(ratios, 10)),
                   per_adapter_min=float(ratios.min()))
    return out


def _pooled(b, l, c, idx: np.ndarray, gain_l: np.ndarray, gain_c: np.ndarray, sign: float, n_boot: int,
            seed: int) -> dict:
    """Pooled ratio over the adapters ``idx`` and its two intervals (the adapters themselves kept fixed)."""
    rng = np.random.default_rng(seed)
    num, den = np.zeros(n_boot), np.zeros(n_boot)
    for j in idx:  # paired: one index draw per adapter serves base, lora and comp
        x, y, z = b[j], l[j], c[j]
        draw = rng.integers(0, len(x), size=(n_boot, len(x)))
        num += sign * (z[draw] - x[draw]).mean(1)
        den += sign * (y[draw] - x[draw]).mean(1)
    pick = idx[rng.integers(0, len(idx), size=(n_boot, len(idx)))]
    return {"pooled": float(gain_c[idx].sum() / gain_l[idx].sum()), "ci_sentences": _interval(num / den),
            "ci_adapters": _interval(gain_c[pick].sum(1) / gain_l[pick].sum(1))}


def _interval(samples: np.ndarray) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def difference(base: dict, lora: dict, first: dict, second: dict, names: list[str], *, loss: bool,
               n_boot: int = 1000, seed: int = 0) -> dict:
    """Pooled retained benefit of ``first`` minus that of ``second`` over ``names``, and its 95% interval
    over each adapter's eval sentences, both settings scored on the same draws (paired: far tighter
    than comparing two separate intervals)."""
    if not names:
        raise ValueError("names: expected at least one adapter, got none")
    sign = -1.0 if loss else 1.0
    rng = np.random.default_rng(seed)
    num1, num2, den = np.zeros(n_boot), np.zeros(n_boot), np.zeros(n_boot)
    d1 = d2 = dl = 0.0
    for n in names:
        x, y = np.asarray(base[n], dtype=np.float64), np.asarray(lora[n], dtype=np.float64)
        z1, z2 = np.asarray(first[n], dtype=np.float64), np.asarray(second[n], dtype=np.float64)
        d1, d2, dl = d1 + sign * (z1.mean() - x.mean()), d2 + sign * (z2.mean() - x.mean()), dl + sign * (y.mean() - x.mean())
        draw = rng.integers(0, len(x), size=(n_boot, len(x)))
        num1 += sign * (z1[draw] - x[draw]).mean(1)
        num2 += sign * (z2[draw] - x[draw]).mean(1)
        den += sign * (y[draw] - x[draw]).mean(1)
    return {"difference": float((d1 - d2) / dl), "ci_sentences": _interval((num1 - num2) / den)}
