"""What every section of the run is handed: the settings, the device, the clock, the record."""

from __future__ import annotations

import dataclasses
import time

import torch

from .record import Recorder
from .settings import Settings

__all__ = ["Run"]


@dataclasses.dataclass
class Run:
    """What every section needs: settings, device, budget, the record.

    Attributes:
        settings: The run's settings.
        device: Where the models and products live.
        t0: Monotonic start of the budget.
        recorder: The JSON record.
    """

    settings: Settings
    device: torch.device
    t0: float
    recorder: Recorder

    @property
    def deadline(self) -> float:
        """Monotonic time at which the budget is spent."""
        return self.t0 + self.settings.budget_s

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        """One progress line, flushed (the device tool shows the tail of stdout)."""
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)
