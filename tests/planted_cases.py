"""A family of planted clustering problems: every case has an exact clustered JD-Full.

Each case is drawn from its index alone, so a failure names a reproducible case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jdlora_ops.compress import ModuleSpec

# (d, number of cases): d = 4096 only with few adapters and modules, to keep the time modest.
_WIDTHS = [(64, 44), (384, 12), (4096, 6)]


@dataclass(frozen=True)
class PlantedCase:
    index: int
    d: int
    sizes: tuple[int, ...]
    rank: int
    adapter_ranks: tuple[int, ...]
    layers: int
    kinds: tuple[str, ...]

    @property
    def modules(self) -> list[ModuleSpec]:
        shape = {"q_proj": (self.d, self.d), "v_proj": (self.d // 2, self.d), "o_proj": (self.d, self.d)}
        return [ModuleSpec(f"model.layers.{layer}.self_attn.{kind}", *shape[kind])
                for layer in range(self.layers) for kind in self.kinds]

    def __str__(self) -> str:
        return (f"case{self.index}-d{self.d}-K{len(self.sizes)}-n{sum(self.sizes)}-r{self.rank}"
                f"-m{self.layers * len(self.kinds)}")


def _sizes(gen: torch.Generator, K: int, pattern: int, small: bool) -> tuple[int, ...]:
    top = 2 if small else 5
    if pattern == 0:  # equal
        return (int(torch.randint(1, top + 1, (1,), generator=gen)),) * K
    if pattern == 1:  # unequal, with singletons
        s = torch.randint(1, top + 1, (K,), generator=gen).tolist()
        s[0] = 1
        return tuple(s)
    # one dominant cluster, the rest small (singletons included)
    rest = torch.randint(1, 3, (K - 1,), generator=gen).tolist()
    rest[0] = 1
    return tuple([max(6, 3 * K // 2 if not small else 4)] + rest)


def planted_cases() -> list[PlantedCase]:
    cases = []
    index = 0
    for d, count in _WIDTHS:
        for j in range(count):
            gen = torch.Generator().manual_seed(1000 + index)
            big = d == 4096
            K = 2 + int(torch.randint(0, 3 if big else 24, (1,), generator=gen))  # 2..25 (2..4 for d = 4096)
            sizes = _sizes(gen, K, j % 3, small=big)
            rank = int(torch.randint(2, 7, (1,), generator=gen))
            adapter_ranks = ((rank,), (1, rank), (rank - 1, 1, rank), (1,))[j % 4]
            if big or d == 384:
                layers, kinds = 1, ("q_proj", "v_proj")
            elif j % 11 == 5:
                layers, kinds = 32, ("q_proj", "v_proj", "o_proj")  # 96 modules
            else:
                layers = 1 + j % 2
                kinds = ("q_proj", "v_proj")[: 1 + (j // 2) % 2]
            cases.append(PlantedCase(index, d, sizes, rank, adapter_ranks, layers, kinds))
            index += 1
    return cases
