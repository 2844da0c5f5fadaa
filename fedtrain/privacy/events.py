"""Privacy events: what an accountant is told about a release, as plain data.

A mechanism (clipping plus Gaussian noise, see :mod:`fedtrain.privacy.mechanisms`)
runs on tensors; an accountant only ever sees the event that describes it, in
the style of Google's ``dp_accounting`` library. Keeping the two apart means an
event can be logged, checkpointed or sent to another process as a few numbers,
and that accounting never depends on how the noise was drawn.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping

_FIELDS = ("noise_multiplier", "sample_rate", "steps")


@dataclass(frozen=True)
class GaussianEvent:
    """A Poisson-subsampled Gaussian mechanism applied ``steps`` times.

    Each step includes every record (or client) independently with probability
    ``sample_rate`` and adds Gaussian noise of standard deviation
    ``noise_multiplier`` times the L2 sensitivity (the clip). This is the
    Sampled Gaussian Mechanism of Mironov, Talwar and Zhang 2019 ("Rényi
    Differential Privacy of the Sampled Gaussian Mechanism"), the mechanism of
    DP-SGD (Abadi et al. 2016) and of DP-FedAvg (McMahan et al. 2018).

    ``noise_multiplier = 0`` is allowed and means no privacy: every accountant
    reports ε = ∞ for a history that contains such an event.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        noise = _number("noise_multiplier", self.noise_multiplier)
        if noise < 0.0:
            raise ValueError(
                f"noise_multiplier = {self.noise_multiplier!r}: must be >= 0 (0 means no privacy: ε is infinite)"
            )
        rate = _number("sample_rate", self.sample_rate)
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"sample_rate = {self.sample_rate!r}: must be > 0 and <= 1")
        if isinstance(self.steps, bool):
            raise ValueError(f"steps = {self.steps!r}: expected an integer")
        try:
            steps = operator.index(self.steps)
        except TypeError:
            raise ValueError(f"steps = {self.steps!r}: expected an integer") from None
        if steps < 1:
            raise ValueError(f"steps = {self.steps!r}: must be >= 1")
        # Plain Python numbers, so that equality (used to merge events), hashing
        # and JSON do not depend on whether a caller passed numpy scalars or ints.
        object.__setattr__(self, "noise_multiplier", noise)
        object.__setattr__(self, "sample_rate", rate)
        object.__setattr__(self, "steps", steps)

    def to_json(self) -> dict[str, float | int]:
        """The event as a dict of plain numbers (``json.dumps`` takes it as is)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GaussianEvent:
        """The event that :meth:`to_json` wrote; unknown or missing keys are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"GaussianEvent = {data!r}: expected a mapping with keys {list(_FIELDS)}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"GaussianEvent.{unknown[0]}: unknown key; allowed keys are {list(_FIELDS)}")
        missing = [k for k in ("noise_multiplier", "sample_rate") if k not in data]
        if missing:
            raise ValueError(f"GaussianEvent.{missing[0]}: missing")
        return cls(
            noise_multiplier=data["noise_multiplier"],
            sample_rate=data["sample_rate"],
            steps=data.get("steps", 1),
        )


def _number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"{name} = {value!r}: expected a number")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} = {value!r}: expected a finite number")
    return result
