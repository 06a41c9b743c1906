"""Patch masks for masked-image modeling and the index bookkeeping that goes with them.

A mask is a bool tensor ``[B, grid_h, grid_w]`` over the stride-16 patch grid, True = hidden.
Every image in a batch hides the same number of patches, so visible tokens stack into one
``[B, N_visible, C]`` tensor (the MAE speed-up needs a dense batch, not a ragged one).
"""

from __future__ import annotations

import torch


def random_grid_mask(
    batch_size: int,
    grid_h: int,
    grid_w: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Uniform random mask hiding exactly ``round(mask_ratio * grid_h * grid_w)`` patches per image.

    Returns a BoolTensor ``[batch_size, grid_h, grid_w]`` (True = hidden). The same ``generator``
    state gives the same mask, so masks are reproducible from a seed.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1) (at least one patch stays visible), got {mask_ratio}")
    num_patches = grid_h * grid_w
    num_hidden = int(round(mask_ratio * num_patches))
    noise = torch.rand(batch_size, num_patches, generator=generator, device=generator.device if generator else device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # [B, N] rank of each patch's noise
    mask = ranks < num_hidden  # the num_hidden lowest-noise patches are hidden
    if device is not None:
        mask = mask.to(device)
    return mask.view(batch_size, grid_h, grid_w)


def check_mask(mask: torch.Tensor, batch_size: int, grid_h: int, grid_w: int) -> int:
    """Validate a patch mask for a batch and return the number of hidden patches per image.

    Raises ValueError when the shape does not match the patch grid, when images hide different
    numbers of patches (visible tokens could not be stacked), or when an image hides everything.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = hidden), got dtype {mask.dtype}")
    if tuple(mask.shape) != (batch_size, grid_h, grid_w):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the patch grid "
            f"(batch {batch_size}, {grid_h}x{grid_w} patches of 16 px)"
        )
    hidden_per_image = mask.flatten(1).sum(dim=1)  # [B]
    num_hidden = int(hidden_per_image[0])
    if bool((hidden_per_image != num_hidden).any()):
        raise ValueError(
            "every image in the batch must hide the same number of patches; got "
            f"{sorted(set(hidden_per_image.tolist()))} (use random_grid_mask)"
        )
    if num_hidden >= grid_h * grid_w:
        raise ValueError("the mask hides every patch; keep at least one visible")
    return num_hidden


def visible_indices(mask_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a flat mask ``[B, N]`` (True = hidden) into kept and restore indices.

    Returns ``ids_keep [B, N_visible]`` (visible positions in ascending order) and
    ``ids_restore [B, N]`` such that ``cat([visible, hidden])[ids_restore]`` is the original order
    (MAE's convention, so an MAE decoder can unshuffle with mask tokens appended at the end).
    """
    num_visible = int((~mask_flat[0]).sum())
    # stable sort puts visible (False=0) first, each group in ascending position order
    ids_shuffle = torch.argsort(mask_flat.to(torch.int8), dim=1, stable=True)  # [B, N]
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    return ids_shuffle[:, :num_visible], ids_restore


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Repeat a ``[B, h, w]`` patch mask to a finer ``[B, h*scale, w*scale]`` grid."""
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
