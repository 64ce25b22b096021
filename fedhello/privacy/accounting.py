"""How much privacy a run spends: Opacus's accountants, never a formula of ours.

Central mode is DP-FedAvg with fixed clipping (McMahan et al. 2018): every round each client
takes part independently with probability q = clients_per_round / num_clients (Poisson
sampling, which fedhello switches to under privacy; Opacus's accountants assume exactly it),
and the sum of the clipped updates gets Gaussian noise of standard deviation z C. One round is
the sampled Gaussian mechanism with (q, z); R rounds compose. The unit is a client: adding or
removing one client's whole data changes the sum by at most C.

Local mode: each client adds the noise itself, so the server sees every participant's message
and nothing is amplified by sampling; two updates of one client differ by up to 2 C, so a round
is the Gaussian mechanism with noise multiplier z / 2 at rate 1. A client may be sampled every
round, so R rounds are accounted as R releases (an upper bound for every client).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

from fedhello.config import ExperimentConfig
from fedhello.errors import UserError

Mode = Literal["central", "local"]


@dataclass(frozen=True)
class PrivacyAccounting:
    """A run's privacy settings, resolved: the noise multiplier (given, or found for the target),
    the sampling rate and delta the accountant uses."""

    mode: Mode
    clip_norm: float
    noise_multiplier: float
    sample_rate: float  # central: q of Poisson client sampling; local: 1 (no amplification)
    delta: float
    accountant: Literal["rdp", "prv"]

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise per coordinate: z C."""
        return self.noise_multiplier * self.clip_norm

    @property
    def accounted_multiplier(self) -> float:
        """The noise multiplier the accountant sees per round (local: over a sensitivity of 2 C)."""
        return self.noise_multiplier if self.mode == "central" else self.noise_multiplier / 2

    def epsilon(self, rounds: int) -> float:
        """epsilon at `delta` after `rounds` rounds, as Opacus's accountant computes it."""
        return epsilon_of(self.accountant, self.accounted_multiplier, self.sample_rate, rounds, self.delta)

    def describe(self, rounds: int) -> dict[str, float | str]:
        return {
            "mode": self.mode,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon": self.epsilon(rounds),
        }


def epsilon_of(
    accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """Opacus's epsilon for `steps` compositions of the sampled Gaussian mechanism."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant  # imported when privacy is on (6 s)

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(acc.get_epsilon(delta))


def resolve_privacy(cfg: ExperimentConfig) -> PrivacyAccounting | None:
    """The run's `PrivacyAccounting`, or None without privacy. The noise multiplier is the given
    one or the one Opacus finds for `target_epsilon` over the configured rounds; a run whose
    rounds would spend more than `target_epsilon` is refused here, before training, in one line."""
    p = cfg.privacy
    if p.mode == "none":
        return None
    assert p.clip_norm is not None
    rounds = cfg.federation.rounds
    delta = p.delta if p.delta is not None else 1.0 / cfg.partition.num_clients
    rate = cfg.federation.clients_per_round / cfg.partition.num_clients if p.mode == "central" else 1.0
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        from opacus.accountants.utils import get_noise_multiplier

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
                z = get_noise_multiplier(
                    target_epsilon=p.target_epsilon,
                    target_delta=delta,
                    sample_rate=rate,
                    steps=rounds,
                    accountant=p.accountant,
                )
        except ValueError as e:
            raise UserError(
                f"privacy.target_epsilon: {p.target_epsilon} cannot be met in {rounds} rounds at delta {delta:g} "
                f"({e}); raise target_epsilon or lower federation.rounds"
            ) from None
        if p.mode == "local":
            z *= 2  # the accountant's multiplier is over 2 C
    resolved = PrivacyAccounting(p.mode, p.clip_norm, float(z), rate, delta, p.accountant)
    if p.target_epsilon is not None:
        spent = resolved.epsilon(rounds)
        if spent > p.target_epsilon * 1.0001:
            raise UserError(
                f"privacy.target_epsilon: {rounds} rounds at noise_multiplier {z:g} spend epsilon {spent:.3g} "
                f"> {p.target_epsilon:g} (delta {delta:g}); raise noise_multiplier or lower federation.rounds"
            )
    return resolved
