"""What the run record keeps of a secure round: its stage timings and who survived it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SecureStats:
    """How a secure round went: stage timings, survivors, clipped values, dropouts' stages."""

    stage_seconds: dict[str, float]
    survivors: int
    clipped_values: int
    dropped_at: list[str]  # the stage each dropped hospital was lost at

    def to_json(self) -> dict[str, Any]:
        """The round's `secure-aggregation` entry in metrics.json."""
        return {
            "stage-seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "survivors": self.survivors,
            "clipped-values": self.clipped_values,
        }
