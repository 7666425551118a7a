"""PacaConfig: which linears PaCA adapts and how many input columns it trains."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PacaConfig:
    """Settings of Partial Connection Adaptation.

    r: trainable input columns per adapted linear (1 <= r <= in_features).
    alpha: the trained columns are stored as P = W[:, idx] / scaling with scaling = alpha / r,
        so alpha / r acts as a learning-rate multiplier under Adam (as in the authors' code).
    target_modules: names matched against the last component of each module path
        (PEFT's convention), e.g. "q_proj" matches "model.layers.0.self_attn.q_proj".
    seed: seeds the column selection; the same model and seed always give the same columns.
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"PacaConfig.r must be a positive integer, got {self.r!r}")
        try:
            alpha_ok = self.alpha > 0 and math.isfinite(self.alpha)
        except TypeError:
            alpha_ok = False
        if not alpha_ok:
            raise ValueError(f"PacaConfig.alpha must be positive and finite, got {self.alpha!r}")
        if not self.target_modules:
            raise ValueError("PacaConfig.target_modules is empty: name at least one linear")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)
