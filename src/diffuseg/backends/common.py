"""What every denoiser backend shares."""

from __future__ import annotations

import torch


def softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place: no second buffer of the probabilities' size."""
    scores -= scores.amax(dim=-1, keepdim=True)
    scores.exp_()
    return scores.div_(scores.sum(dim=-1, keepdim=True))
