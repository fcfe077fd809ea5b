"""The public rule that splits a site's images into training and validation.

Torch-free: the count filters (client/privacy/disclosure.py), which load with
the light ClientApp, reason about what the rule lets a coordinator infer.
"""

from __future__ import annotations


def validation_count(images: int, val_fraction: float) -> int:
    """Images held out for validation: `val-fraction` of them, at least one, and at least
    one left to train on (none of a single image)."""
    if images < 2:
        return 0
    return min(images - 1, max(1, round(images * val_fraction)))
