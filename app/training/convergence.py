"""Claim 6's convergence condition: stop when validation loss plateaus, or at a max epoch count."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Convergence:
    patience: int
    rel_tol: float
    max_epochs: int
    best: float = math.inf
    best_epoch: int = -1
    stale: int = 0
    epochs_seen: int = 0

    def update(self, epoch: int, val_loss: float) -> bool:
        """Record one evaluation; True when this one is the new best."""
        self.epochs_seen = max(self.epochs_seen, epoch + 1)
        if val_loss < self.best * (1 - self.rel_tol) or not math.isfinite(self.best):
            self.best, self.best_epoch, self.stale = val_loss, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def reason(self) -> str | None:
        if self.stale >= self.patience:
            return (f"plateau: val loss not improved by {self.rel_tol:g} (relative) for "
                    f"{self.patience} evaluations")
        if self.epochs_seen >= self.max_epochs:
            return f"max epochs ({self.max_epochs}) reached"
        return None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.stale = int(state["stale"])
        self.epochs_seen = int(state["epochs_seen"])
