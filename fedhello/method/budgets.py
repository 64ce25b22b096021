"""Device budgets: what a client's layer set costs, and which layer sets fit a budget.

Plain data and numpy, no torch (the probe steps that calibrate a model are in
`fedhello/engine/calibration.py`). docs/budgets.md explains the model; in short, for a client
that trains the layer set S (n = |S| layers, lowest block m) of a model with L blocks:

    training memory = 3 * P(S) + a0 + a_backward * (L - m) + a_trained * n
    step seconds    =             t0 + t_backward * (L - m) + t_trained * n
    peak memory     = frozen model bytes + training memory
    upload          = the LoRA tensors of S at the client's rank (+ the head when it is trained)

P(S) is the exact byte size of the trained tensors (their gradients and AdamW's two moments:
3 * P(S)); with real freezing only blocks m..L-1 keep activations for backward and run a
backward pass, and each trained layer adds its adapters' inputs. The coefficients a* and t*
are fitted to a few probe steps on worst-case batches (padded to max_length), so the model
holds on the machine that calibrated it; a group's `speed` scales time to its devices.

Every cost grows as the lowest block m goes down and as n goes up, so what a budget allows is
one number per layer count: the lowest block a set of n layers may start at (`LayerLimits`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fedhello.errors import UserError

OPTIMIZER_COPIES = 3  # a gradient and AdamW's two moments per trained value


@dataclass(frozen=True)
class DeviceBudget:
    """A group's device budgets (None: unconstrained) and its speed relative to the calibration."""

    memory: int | None = None
    seconds_per_round: float | None = None
    upload: int | None = None
    speed: float = 1.0

    @property
    def constrained(self) -> bool:
        return self.memory is not None or self.seconds_per_round is not None or self.upload is not None


@dataclass(frozen=True)
class Cost:
    """What one client's round costs: peak memory (frozen model + what training adds), time, upload."""

    model_bytes: int
    training_bytes: int
    seconds_per_step: float
    steps: int
    upload_bytes: int
    speed: float = 1.0

    @property
    def memory_bytes(self) -> int:
        return self.model_bytes + self.training_bytes

    @property
    def seconds(self) -> float:
        """Training seconds per round on the group's device."""
        return self.steps * self.seconds_per_step / self.speed

    def over(self, budget: DeviceBudget) -> list[str]:
        """Which budgets this cost exceeds ("memory", "time", "upload")."""
        out = []
        if budget.memory is not None and self.memory_bytes > budget.memory:
            out.append("memory")
        if budget.seconds_per_round is not None and self.seconds > budget.seconds_per_round:
            out.append("time")
        if budget.upload is not None and self.upload_bytes > budget.upload:
            out.append("upload")
        return out


@dataclass(frozen=True)
class Probe:
    """One measured probe: a layer set and what its worst-case training step cost (the median of
    `step_seconds`, every measured step of every pass)."""

    layers: tuple[int, ...]
    training_bytes: int
    seconds_per_step: float
    step_seconds: tuple[float, ...] = ()

    @property
    def spread(self) -> float:
        """The relative spread of the step times: interquartile range / median (0 for one step)."""
        if len(self.step_seconds) < 2 or self.seconds_per_step <= 0:
            return 0.0
        q25, q75 = np.percentile(self.step_seconds, [25, 75])
        return float((q75 - q25) / self.seconds_per_step)


NOISY_SPREAD = 0.25  # a probe whose step times spread more than this (IQR / median) is noisy
NOISY_RESIDUAL = 0.15  # a time fit whose relative RMS residual over the probes exceeds this is noisy


@dataclass(frozen=True)
class FitQuality:
    """How far a calibration can be trusted: the largest relative spread of a probe's step times,
    the time fit's relative RMS residual over the probes, the measuring attempts it took, and
    whether it stayed noisy after them (either figure over its limit)."""

    probe_spread: float
    time_residual: float
    attempts: int = 1

    @property
    def noisy(self) -> bool:
        return self.probe_spread > NOISY_SPREAD or self.time_residual > NOISY_RESIDUAL

    @property
    def badness(self) -> float:
        """How far over its limits the worse figure is (below 1: not noisy); the best attempt is kept."""
        return max(self.probe_spread / NOISY_SPREAD, self.time_residual / NOISY_RESIDUAL)

    def describe(self) -> str:
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        verdict = "NOISY" if self.noisy else "ok"
        return (
            f"{verdict} (probe step-time spread {self.probe_spread:.1%}, time fit residual "
            f"{self.time_residual:.1%}{tries})"
        )


@dataclass
class CostModel:
    """The calibrated costs of one model, batch shape, LoRA config and device (JSON-able)."""

    num_layers: int
    model_bytes: int  # every parameter and buffer of the frozen model, at its dtype
    layer_bytes: list[int]  # the LoRA tensors of each block, at the full rank
    head_bytes: int  # the trained head (0 when the head is not trained)
    rank: int  # the adapters' full rank
    memory_coef: list[float]  # a0, a_backward, a_trained
    time_coef: list[float]  # t0, t_backward, t_trained
    device: str = "cpu"
    batch_shape: str = ""  # what a worst-case batch looked like, e.g. "16 x 64 tokens"
    probes: list[Probe] = field(default_factory=list)
    quality: FitQuality | None = None  # None: calibrated before fit quality was recorded

    # -- predictions ------------------------------------------------------------------------
    def features(self, layers: Sequence[int]) -> np.ndarray:
        """[1, blocks in the backward pass, trained layers] of a layer set."""
        m = min(layers)
        return np.array([1.0, self.num_layers - m, len(layers)])

    def trained_bytes(self, layers: Iterable[int]) -> int:
        return sum(self.layer_bytes[i] for i in layers) + self.head_bytes

    def upload_bytes(self, layers: Iterable[int], rank: int | None = None) -> int:
        """The LoRA tensors of `layers` at `rank` (A is r x in, B is out x r: linear in r), plus the head."""
        k = self.rank if rank is None else rank
        return sum(self.layer_bytes[i] * k // self.rank for i in layers) + self.head_bytes

    def training_bytes(self, layers: Sequence[int]) -> int:
        fitted = float(self.features(layers) @ np.asarray(self.memory_coef))
        return round(OPTIMIZER_COPIES * self.trained_bytes(layers) + max(0.0, fitted))

    def seconds_per_step(self, layers: Sequence[int]) -> float:
        return max(0.0, float(self.features(layers) @ np.asarray(self.time_coef)))

    def predict(self, layers: Sequence[int], steps: int, rank: int | None = None, speed: float = 1.0) -> Cost:
        """The cost of training `layers` (non-empty) for `steps` steps at `rank` on a device of `speed`."""
        return Cost(
            self.model_bytes,
            self.training_bytes(layers),
            self.seconds_per_step(layers),
            steps,
            self.upload_bytes(layers, rank),
            speed,
        )

    # -- what fits --------------------------------------------------------------------------
    def limits(self, budget: DeviceBudget, steps: int, rank: int | None = None) -> LayerLimits:
        """For each layer count, the lowest block a set may start at within `budget`.

        Blocks may differ in LoRA bytes; a count is judged by its costliest sets (the largest
        blocks), so whatever set the limits admit fits."""
        L = self.num_layers
        lowest: list[int | None] = []
        for n in range(1, L + 1):
            allowed = None
            for m in range(L - n, -1, -1):  # costs grow as m goes down: stop at the first misfit
                if self.predict(self._costliest(m, n), steps, rank, budget.speed).over(budget):
                    break
                allowed = m
            lowest.append(allowed)
        every = tuple(range(L))
        full_fits = not self.predict(every, steps, None, budget.speed).over(
            DeviceBudget(budget.memory, budget.seconds_per_round, None, budget.speed)
        )
        max_rank = None
        if full_fits:
            fitting = [k for k in range(1, self.rank + 1) if not _over_upload(self, every, k, budget)]
            max_rank = max(fitting) if fitting else None
        return LayerLimits(tuple(lowest), max_rank)

    def _costliest(self, lowest: int, count: int) -> tuple[int, ...]:
        """The costliest set of `count` layers whose lowest block is `lowest`."""
        above = sorted(range(lowest + 1, self.num_layers), key=lambda i: (-self.layer_bytes[i], i))
        return tuple(sorted([lowest, *above[: count - 1]]))

    def smallest_need(self, steps: int, speed: float = 1.0) -> Cost:
        """The cheapest any client can be: the top block alone (at rank 1 for the upload)."""
        return self.predict((self.num_layers - 1,), steps, 1, speed)

    # -- storage ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CostModel:
        data = dict(obj)
        data["probes"] = [
            Probe(
                tuple(p["layers"]),
                int(p["training_bytes"]),
                float(p["seconds_per_step"]),
                tuple(float(x) for x in p.get("step_seconds", ())),
            )
            for p in data.get("probes", [])
        ]
        if data.get("quality") is not None:
            data["quality"] = FitQuality(**data["quality"])
        return cls(**data)

    def fitted(self, probes: Sequence[Probe], attempts: int = 1) -> tuple[CostModel, FitQuality]:
        """This model with its memory and time coefficients fitted to `probes`, and the fit's
        quality (docs/budgets.md, "Calibration").

        Every per-block and per-layer coefficient is a cost, so the fit is non-negative least
        squares: fewer layers, or a higher lowest block, never cost more, however noisy the
        probes. The time constant is a cost too; the memory constant may be negative (what the
        measured baseline happens to include)."""
        features = np.stack([self.features(p.layers) for p in probes])
        memory = np.array(
            [p.training_bytes - OPTIMIZER_COPIES * self.trained_bytes(p.layers) for p in probes]
        )
        seconds = np.array([p.seconds_per_step for p in probes])
        time_coef = fit_coefficients(features, seconds)
        relative = (features @ np.asarray(time_coef) - seconds) / np.maximum(seconds, 1e-12)
        quality = FitQuality(
            probe_spread=max((p.spread for p in probes), default=0.0),
            time_residual=float(np.sqrt(np.mean(relative**2))),
            attempts=attempts,
        )
        model = replace(
            self,
            memory_coef=fit_coefficients(features, memory.astype(float), free_constant=True),
            time_coef=time_coef,
            probes=list(probes),
            quality=quality,
        )
        return model, quality


def _over_upload(model: CostModel, layers: Sequence[int], rank: int, budget: DeviceBudget) -> bool:
    return budget.upload is not None and model.upload_bytes(layers, rank) > budget.upload


@dataclass(frozen=True)
class LayerLimits:
    """What a client's budgets allow: `lowest[n-1]` is the lowest block a set of n layers may start
    at (None: no set of n layers fits); `max_rank` the largest rank at which all layers fit
    (rank-heterogeneous methods; None: all layers never fit)."""

    lowest: tuple[int | None, ...]
    max_rank: int | None = None

    def fits(self, layers: Sequence[int]) -> bool:
        if not layers:
            return True
        allowed = self.lowest[len(layers) - 1]
        return allowed is not None and min(layers) >= allowed

    def counts(self) -> list[int]:
        """The layer counts some set fits."""
        return [n for n, m in enumerate(self.lowest, start=1) if m is not None]

    def describe(self) -> str:
        """'1-4 layers; 4 from block 2, 3 from block 1, ...' as the plan prints it."""
        counts = self.counts()
        if not counts:
            return "nothing fits"
        parts = [f"{n} from block {self.lowest[n - 1]}" for n in sorted(counts, reverse=True)]
        most = max(counts)
        return f"up to {most} layer{'s' if most > 1 else ''}: " + ", ".join(parts)


def fit_coefficients(features: np.ndarray, values: np.ndarray, *, free_constant: bool = False) -> list[float]:
    """Least-squares coefficients of the cost model, each >= 0 (the first, the constant, free
    when `free_constant`): scipy's bounded-variable least squares."""
    from scipy.optimize import lsq_linear

    lower = np.zeros(features.shape[1])
    if free_constant:
        lower[0] = -np.inf
    result = lsq_linear(features, values, bounds=(lower, np.inf), method="bvls")
    return [max(float(x), lo) for x, lo in zip(result.x, lower, strict=True)]


def probe_sets(num_layers: int) -> list[tuple[int, ...]]:
    """The layer sets calibration measures: the top block, the bottom block, the top half and all
    (they tell the constant, the backward term and the per-layer term apart)."""
    L = num_layers
    sets = [(L - 1,), (0,), tuple(range(L // 2, L)), tuple(range(L))]
    return list(dict.fromkeys(sets))


def check_budget_fits(limits: LayerLimits, need: Cost, budget: DeviceBudget, where: str) -> None:
    """A one-line error, before training, for a budget nothing fits (not even the top block)."""
    if limits.counts():
        return
    parts = []
    if budget.memory is not None and need.memory_bytes > budget.memory:
        parts.append(
            f"memory {format_bytes(budget.memory)} is below the least a client needs, "
            f"{format_bytes(need.memory_bytes)} (frozen model {format_bytes(need.model_bytes)} "
            f"+ training the top block {format_bytes(need.training_bytes)})"
        )
    if budget.seconds_per_round is not None and need.seconds > budget.seconds_per_round:
        parts.append(
            f"seconds_per_round {budget.seconds_per_round:g} is below the least a client needs, "
            f"{need.seconds:.3g} s ({need.steps} steps of the top block alone)"
        )
    if budget.upload is not None and need.upload_bytes > budget.upload:
        parts.append(
            f"upload {format_bytes(budget.upload)} is below one layer at rank 1 "
            f"({format_bytes(need.upload_bytes)})"
        )
    raise UserError(f"{where}: " + ("; ".join(parts) or "no layer set fits these budgets"))


def format_bytes(n: float) -> str:
    """Bytes in binary units, as budgets are usually written (1.5 GiB, 300 MiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


def ceil_steps(num_examples: int, batch_size: int, epochs: int, local_steps: int | None) -> int:
    """The steps a client with this many examples takes in a round."""
    per_epoch = max(1, math.ceil(num_examples / batch_size))
    total = per_epoch * epochs
    return total if local_steps is None else min(total, local_steps)
