"""Global inner products of tensor lists, for methods that decompose one gradient along another.

LookSAM and GSAM split a gradient into its component along a second gradient and the rest,
with one inner product and one norm over *all* parameters (the model seen as one vector).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_dot"]


def global_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``sum_i <a_i, b_i>`` over parallel tensor lists, as a 0-dim tensor (no host sync).

    Accumulated in at least float32 (float64 stays float64), on the device of ``a[0]``.
    An empty list gives 0.
    """
    if len(a) != len(b):
        raise ValueError(f"global_dot: lists of different lengths ({len(a)} and {len(b)})")
    if len(a) == 0:
        return torch.zeros(())
    device = a[0].device
    dtype = torch.float32
    for x in a:
        dtype = torch.promote_types(dtype, x.dtype)
    parts = []
    for x, y in zip(a, b):
        if x.dtype.itemsize < 4:  # float16/bfloat16: multiply and sum in float32
            x, y = x.float(), y.float()
        parts.append(torch.vdot(x.reshape(-1), y.reshape(-1)).to(device, dtype))
    return torch.stack(parts).sum()
