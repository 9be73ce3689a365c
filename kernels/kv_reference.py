"""The pure-torch reference of the KV dequantisation kernel (`kernels/kv_dequant.py`), in a module of
its own so the KV codec can use it without importing Triton (whose import must wait until a process
has chosen the interpreter or the GPU)."""

from __future__ import annotations

import torch


def dequantize_int8_reference(
    kq: torch.Tensor,
    kscale: torch.Tensor,
    kmin: torch.Tensor,
    vq: torch.Tensor,
    vscale: torch.Tensor,
    vmin: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference int8 -> float reconstruction: keys per channel, values per token.

    kq, vq: uint8 (L, H, T, D); kscale, kmin: (L, H, D); vscale, vmin: (L, H, T). Computed in float32,
    returned as new contiguous tensors in `dtype`.
    """
    keys = torch.addcmul(kmin.float().unsqueeze(2), kq.to(torch.float32), kscale.float().unsqueeze(2))
    values = torch.addcmul(vmin.float().unsqueeze(3), vq.to(torch.float32), vscale.float().unsqueeze(3))
    if dtype != torch.float32:
        keys, values = keys.to(dtype), values.to(dtype)
    return keys.contiguous(), values.contiguous()
