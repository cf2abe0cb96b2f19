"""The same layers written with plain PyTorch ops (gather + bmm).

This is what a server without custom kernels would run: every token gathers
its own copy of the weights it needs. It is the yardstick the kernels are
benchmarked against, and works on any device and dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["jd_fused_torch", "lora_torch"]


def jd_fused_torch(
    x: torch.Tensor, V_stacks: Sequence[torch.Tensor], S_stacks: Sequence[torch.Tensor],
    U_stacks: Sequence[torch.Tensor], slice_offsets: Sequence[int], token_lora_mapping: torch.Tensor,
    adapter_cluster: torch.Tensor, y: torch.Tensor,
) -> torch.Tensor:
    """``y[t, slice s] += U_s[c(t)] S_s[a(t)] V_s[c(t)] x[t]`` by gathers and bmm, in place."""
    has = token_lora_mapping >= 0
    slot = token_lora_mapping.clamp(min=0).long()
    clus = adapter_cluster.long()[slot]
    keep = has.to(x.dtype)[:, None]
    for V, S, U, off in zip(V_stacks, S_stacks, U_stacks, slice_offsets):
        h = torch.bmm(V[clus], x[:, :, None])  # [T, r, 1]
        g = torch.bmm(S[slot], h) if S.dim() == 3 else S[slot][:, :, None] * h
        d = U.shape[1]
        y[:, off : off + d] += torch.bmm(U[clus], g)[:, :, 0] * keep
    return y


def lora_torch(
    x: torch.Tensor, A_stacks: Sequence[torch.Tensor], B_stacks: Sequence[torch.Tensor], scales: torch.Tensor,
    slice_offsets: Sequence[int], token_lora_mapping: torch.Tensor, y: torch.Tensor,
) -> torch.Tensor:
    """Uncompressed multi-LoRA: ``y[t, slice s] += scales[a] B_s[a] A_s[a] x[t]`` by gathers and bmm."""
    has = token_lora_mapping >= 0
    slot = token_lora_mapping.clamp(min=0).long()
    sc = (scales[slot] * has).to(x.dtype)[:, None]
    for A, B, off in zip(A_stacks, B_stacks, slice_offsets):
        h = torch.bmm(A[slot], x[:, :, None])
        d = B.shape[1]
        y[:, off : off + d] += torch.bmm(B[slot], h)[:, :, 0] * sc
    return y
