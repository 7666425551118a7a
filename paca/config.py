"""PacaConfig: which linears PaCA adapts and how many input columns it trains.

Torch-free (the profiler's torch-free half imports LLAMA_TARGETS from here). The targeting
fields mean what PEFT's LoraConfig fields of the same name mean; matching them against a model
is paca/targets.py's job. The file format of a saved adapter (adapter_config.json, the authors'
field names) is paca/io.py's.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"


@dataclass
class PacaConfig:
    """Settings of Partial Connection Adaptation.

    r: trainable input columns per adapted linear (1 <= r <= in_features).
    alpha: the trained columns are stored as P = W[:, idx] / scaling with scaling = alpha / r,
        so alpha / r acts as a learning-rate multiplier under Adam (as in the authors' code).
        Saved as `paca_alpha`, the authors' name.
    target_modules: as PEFT takes them. A list: a module is a target if its path equals an
        entry or ends with "." + entry ("q_proj" matches "model.layers.0.self_attn.q_proj").
        A string: a regular expression that must match the whole path. "all-linear": every
        nn.Linear except the output layer (model.get_output_embeddings()).
    exclude_modules: paths never adapted; a list (same matching) or a regular expression.
    layers_to_transform: only the decoder layers with these indices (an int or a list), found
        in the path by `layers_pattern` (default: "layers", "h", "block", "blocks", "layer").
    rank_pattern, alpha_pattern: {regex: r} and {regex: alpha} overrides per module; a key
        matches a path that ends with it (PEFT's rule).
    modules_to_save: modules trained in full beside the adapter (e.g. a new classifier head),
        saved with it; the same matching as a target_modules list.
    seed: seeds the column selection; the same model and seed always give the same columns.

    Limits: nn.Linear targets only (and bitsandbytes' Linear4bit, see paca/quantized.py); no
    bias training; one adapter per model.
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_TARGETS))
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    seed: int = 0

    def __post_init__(self):
        self.target_modules = _names_or_regex(self.target_modules, "target_modules")
        if not self.target_modules:
            raise ValueError("PacaConfig.target_modules is empty: name at least one linear")
        if self.exclude_modules is not None:
            self.exclude_modules = _names_or_regex(self.exclude_modules, "exclude_modules")
        _check_r(self.r, "PacaConfig.r")
        _check_alpha(self.alpha, "PacaConfig.alpha")
        if isinstance(self.layers_to_transform, int) and not isinstance(
            self.layers_to_transform, bool
        ):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None:
            layers = list(self.layers_to_transform)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(
                    f"PacaConfig.layers_to_transform must hold layer indices >= 0, got "
                    f"{self.layers_to_transform!r}"
                )
            self.layers_to_transform = layers
        if self.layers_pattern is not None:
            self.layers_pattern = _names(self.layers_pattern, "layers_pattern")
            if self.layers_to_transform is None:
                raise ValueError("PacaConfig.layers_pattern needs layers_to_transform")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "PacaConfig.layers_to_transform works with a list of target_modules, not a "
                "regular expression (as in PEFT): put the layers into the expression instead"
            )
        self.rank_pattern = _pattern(self.rank_pattern, "rank_pattern", _check_r)
        self.alpha_pattern = _pattern(self.alpha_pattern, "alpha_pattern", _check_alpha)
        if self.modules_to_save is not None:
            self.modules_to_save = _names(self.modules_to_save, "modules_to_save")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"PacaConfig.seed must be an integer, got {self.seed!r}")

    @property
    def scaling(self) -> float:
        """alpha / r of the layers that no pattern overrides."""
        return self.alpha / self.r

    @property
    def paca_alpha(self) -> float:
        """The authors' (and adapter_config.json's) name for alpha."""
        return self.alpha

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) of the module at `path`, after rank_pattern and alpha_pattern."""
        return (
            _first_match(self.rank_pattern, path, self.r),
            _first_match(self.alpha_pattern, path, self.alpha),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _first_match(pattern: dict, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_r(value, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_alpha(value, what: str) -> None:
    try:
        ok = value > 0 and math.isfinite(value) and not isinstance(value, bool)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{what} must be positive and finite, got {value!r}")


def _names(value, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    try:
        names = list(value)
    except TypeError:
        raise ValueError(f"PacaConfig.{what} must be a list of names, got {value!r}") from None
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"PacaConfig.{what} must hold non-empty names, got {value!r}")
    return names


def _names_or_regex(value, what: str) -> list[str] | str:
    """A string stays a string (a regular expression, or "all-linear"), as in PEFT."""
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(
                    f"PacaConfig.{what} {value!r} is not a regular expression: {error}"
                ) from None
        return value
    return sorted(_names(value, what)) if isinstance(value, (set, frozenset)) else _names(
        value, what
    )


def _pattern(value, what: str, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"PacaConfig.{what} must be a dict of regex -> value, got {value!r}")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"PacaConfig.{what} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as error:
            raise ValueError(f"PacaConfig.{what} key {key!r} is not a regex: {error}") from None
        check(item, f"PacaConfig.{what}[{key!r}]")
    return dict(value)
