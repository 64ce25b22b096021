"""Client-level differential privacy for heterogeneous LoRA (docs/privacy.md): the accountant
(`accounting.py`, Opacus's) and the mechanism (`mechanism.py`: clipping a client's whole update,
Gaussian noise, the server's noised mean over the clients the plan assigned to each tensor)."""

from fedhello.privacy.accounting import PrivacyAccounting, resolve_privacy
from fedhello.privacy.mechanism import clip_update, noised, private_mean, update_norm

__all__ = ["PrivacyAccounting", "clip_update", "noised", "private_mean", "resolve_privacy", "update_norm"]
