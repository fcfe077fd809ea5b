"""Where a hospital's training runs: its GPU when it has one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """Resolve `auto|cpu|cuda|cuda:N`; asking for CUDA on a CPU-only node is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{requested}' requested but CUDA is not available here")
    return device
