"""The pure-PyTorch implementation of applying a plan.

Used when the extension is not built, with ``backend="torch"``, and as the
reference the kernels are tested against: for the same plan it gives the same
bits. Vectorised over the whole batch, with no Python loop over samples and
no host synchronisation (so it traces into one graph). Unlike the kernels it
reads the whole batch and writes every element back, unchanged ones with
their own value: selecting only the moved elements would need a data-dependent
shape.
"""

import torch

# A swap moves bits, never values: viewing floats as same-width integers keeps
# every payload (NaNs included) exactly as it was.
_AS_INTEGER = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def apply_plan_torch(
    x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor, patch_h: int, patch_w: int
) -> None:
    """Exchange the masked cells of every pair in ``x`` ((N, H, W) or (N, C, H, W)), in place."""
    n = x.shape[0]
    if x.numel() == 0 or n < 2:
        return
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) // patch_h
    cols = torch.arange(w, device=x.device) // patch_w
    moved = mask[:, rows[:, None], cols[None, :]]  # (N, H, W): the cell mask per pixel
    if x.dim() == 4:
        moved = moved.unsqueeze(1)
    # The mask is the same for both members, so each simply takes its
    # partner's pixels where the mask is set.
    source = torch.where(partner >= 0, partner, torch.arange(n, device=x.device))
    bits = x.view(_AS_INTEGER.get(x.dtype, x.dtype))
    torch.where(moved, bits[source], bits, out=bits)
