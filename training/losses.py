"""Losses. Image-text InfoNCE is open_clip's `ClipLoss` (which also gathers features across
ranks under torchrun / accelerate)."""

from __future__ import annotations

import torch


def clip_loss_fn(rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    """Symmetric image-text contrastive loss; gathers with gradients when distributed."""
    from open_clip.loss import ClipLoss

    return ClipLoss(
        local_loss=world_size > 1,
        gather_with_grad=world_size > 1,
        cache_labels=True,
        rank=rank,
        world_size=world_size,
    )
