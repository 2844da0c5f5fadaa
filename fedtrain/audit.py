"""``fedtrain audit``: an empirical lower bound on a run's ε, from that one run.

The config runs once, as :func:`fedtrain.simulation.simulate` runs it — the
same noise, the same secret cohort, the same accountant — with canaries
inserted (:mod:`fedtrain.training.canary`); the canaries' scores give a
lower bound on ε at a stated confidence (:mod:`fedtrain.privacy.audit`,
Steinke, Nasr & Jagielski 2023). ``audit.json`` in the run folder holds the
run's claimed ε next to the bound. A correct mechanism's bound stays below
its claim (with probability at least the confidence); one-run audits are
loose, so a bound far below the claim is the normal outcome, and a bound
above it means the mechanism, its accounting or its code is wrong.

What is audited: user-level DP and runs without DP with canary clients,
sample-level DP with canary records. Distributed DP, secure aggregation,
uplink compression and asynchronous runs are refused (the canaries would
have to pass through the clients' masking, noise shares and codecs, which
they do not).
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtrain.config import Compression, Config, ConfigError, PrivacyMode, RunMode

AUDIT_FILE = "audit.json"
DEFAULT_CANARIES = 1000
DEFAULT_CONFIDENCE = 0.95
PAPER = 'Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023), arXiv:2305.08846'
CANARY_CLIENT_PAPER = (
    'Andrew et al. 2024, "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024)'
)


class CanaryKind(str, enum.Enum):
    """What a canary is: a client (user level, no DP) or a record (sample level)."""

    CLIENT = "client"
    RECORD = "record"


@dataclass(frozen=True)
class AuditResult:
    """The audit's outcome: the run's claim, the bound, and how it was found;
    with every canary's inclusion bit and score, so that anyone can recompute
    the bound from ``audit.json`` (:func:`fedtrain.privacy.audit.audit_bound`)."""

    claimed_epsilon: float | None
    delta: float
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    inserted: int
    guesses: int
    correct: int
    guess_in: int
    guess_out: int
    choices: int
    kind: CanaryKind
    privacy_mode: PrivacyMode
    run_dir: Path
    included: tuple[bool, ...]
    scores: tuple[float, ...]

    def as_json(self) -> dict[str, Any]:
        score = (
            "<θ_T − θ_0, u_c>: the final model's movement along canary c's direction"
            if self.kind is CanaryKind.CLIENT else "−loss of the final model on canary record c"
        )
        return {
            "claimed_epsilon": self.claimed_epsilon,
            "delta": self.delta,
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "confidence": self.confidence,
            "canaries": {
                "count": self.canaries,
                "inserted": self.inserted,
                "guesses": self.guesses,
                "correct": self.correct,
                "guessed_in": self.guess_in,
                "guessed_out": self.guess_out,
                "kind": self.kind.value,
                "included": [int(b) for b in self.included],
                "scores": list(self.scores),
            },
            "privacy_mode": self.privacy_mode.value,
            "method": {
                "name": "one-run audit, (ε, δ) bound",
                "score": score,
                "guesses": f"k+ = k− from {self.choices} counts, union bound over them on the confidence",
                "canaries": CANARY_CLIENT_PAPER if self.kind is CanaryKind.CLIENT else "random records, random labels",
            },
            "paper": PAPER,
        }

    def line(self) -> str:
        """The two numbers side by side, as the CLI prints them."""
        claim = "none (no DP)" if self.claimed_epsilon is None else f"{self.claimed_epsilon:.3f}"
        return (
            f"claimed ε = {claim}, audited lower bound ε ≥ {self.epsilon_lower_bound:.3f} "
            f"at {self.confidence:.0%} confidence (δ = {self.delta:g}; {self.correct} of {self.guesses} guesses "
            f"right, {self.inserted} of {self.canaries} canary {self.kind.value}s inserted)"
        )


def canary_kind(config: Config) -> CanaryKind:
    """The canaries that audit ``config``'s mechanism, or a refusal naming the key."""
    if config.run.mode is RunMode.ASYNC:
        raise ConfigError(
            "run.mode = 'async': fedtrain audit runs the synchronous round loop only; allowed: run.mode = 'sync'"
        )
    if config.secure.aggregation:
        raise ConfigError(
            "secure.aggregation = true: fedtrain audit does not insert canaries into secure aggregation; "
            "allowed: secure.aggregation = false"
        )
    if config.compression.up is not Compression.NONE:
        raise ConfigError(
            f"compression.up = {config.compression.up.value!r}: fedtrain audit's canary clients send plain "
            "updates; allowed: compression.up = 'none'"
        )
    mode = config.privacy.mode
    if mode in (PrivacyMode.USER, PrivacyMode.NONE):
        return CanaryKind.CLIENT
    if mode is PrivacyMode.SAMPLE:
        return CanaryKind.RECORD
    raise ConfigError(
        f"privacy.mode = {mode.value!r}: fedtrain audit does not audit it (its noise comes in shares inside "
        "secure aggregation); allowed: 'user', 'sample', 'none'"
    )


def audit(
    config: Config,
    out_dir: str | Path,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: bool = False,
) -> AuditResult:
    """Run ``config`` once in ``out_dir`` with ``canaries`` canaries (each in
    with probability ½, by a :mod:`secrets` coin), write ``audit.json``
    there, and return the claimed ε with the audited lower bound at
    ``confidence``."""
    from fedtrain.privacy.audit import audit_bound
    from fedtrain.simulation import simulate
    from fedtrain.training.canary import CanaryClients, CanaryDraw, CanaryPlan, CanaryRecords

    if canaries < 2:
        raise ConfigError(f"--canaries = {canaries}: an audit needs at least 2 canaries")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence = {confidence}: must be in (0, 1), e.g. 0.95")
    kind = canary_kind(config)
    draw = CanaryDraw.secret(canaries)
    plan: CanaryPlan = CanaryClients(draw) if kind is CanaryKind.CLIENT else CanaryRecords(draw)
    result = simulate(config, out_dir, progress=progress, canaries=plan)
    scores = plan.scores(result.params)
    bound = audit_bound(scores, draw.included, config.privacy.delta, confidence)
    best = bound.best
    run_dir = result.run_dir if result.run_dir is not None else Path(out_dir)
    outcome = AuditResult(
        claimed_epsilon=result.summary.epsilon,
        delta=config.privacy.delta,
        epsilon_lower_bound=bound.epsilon_lower_bound,
        confidence=confidence,
        canaries=canaries,
        inserted=bound.included,
        guesses=0 if best is None else best.made,
        correct=0 if best is None else best.correct,
        guess_in=0 if best is None else best.guess_in,
        guess_out=0 if best is None else best.guess_out,
        choices=bound.choices,
        kind=kind,
        privacy_mode=config.privacy.mode,
        run_dir=run_dir,
        included=draw.included,
        scores=tuple(scores),
    )
    path = run_dir / AUDIT_FILE
    tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
    tmp.write_text(json.dumps(outcome.as_json(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return outcome
