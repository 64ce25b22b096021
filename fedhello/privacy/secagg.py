"""Secure aggregation for heterogeneous layer sets: SecAgg+ (Bell et al. 2020, as Flower
implements it) per tensor, so the server learns only each tensor's sum (docs/privacy.md).

Every client of a round trains its own tensors (its layer set, or rank slices zero-padded to
the global shape), so the masks must cancel per tensor, among the clients that train it. The
round's plan is public to the round's clients, so each client knows, for each neighbour, which
tensors both of them send:

1. key advertisement: each client makes two EC key pairs (one to encrypt shares, one to agree
   the pairwise mask seeds) and sends the public keys; the server forwards them to its
   neighbours (a ring of `neighbours` clients, SecAgg+'s sparse graph);
2. share keys: each client draws a private mask seed b, splits b and its masking secret key into
   Shamir shares (`threshold` of them reconstruct), keeps one and sends each neighbour its
   shares, encrypted with their agreed key, through the server;
3. masked input: each client quantises its update (Flower's stochastic quantisation into
   [0, Q]) in `limbs` limbs: the first quantises the value clipped to [-c, c], each next one
   what the limbs before left, at a step Q/2 times finer, so that two limbs carry a float32
   value exactly (`quantise_in_limbs`) where one carries it to within 2c/Q. It multiplies every
   limb by its integer weight and adds, modulo 2^field_bits, its private mask PRG(b) and for
   every neighbour that trains the same tensor the pairwise mask +-PRG(s_ij) (sign by id order).
   Its weight goes along, masked the same way, so the weighted mean needs no plain count;
4. unmasking: the server names who sent masked input and who dropped; the survivors send their
   shares of the senders' b and of the dropped clients' secret keys; the server rebuilds them,
   removes the private masks and the dropped clients' leftover pairwise masks, and divides each
   tensor's weighted sum by its summed weight.

A client that disappears after its masked input is recovered from its neighbours' shares of b;
one that disappears before it, from their shares of its secret key. When fewer than `threshold`
of a client's neighbours answer, nothing can be recovered: the round is skipped (`SkippedRound`
says which tensors and clients) and the run goes on.

The primitives are Flower's (`flwr.common.secure_aggregation`: Shamir sharing, the shared-key
derivation and authenticated encryption, the quantiser, the mask generator) and `cryptography`'s
elliptic-curve keys; nothing cryptographic is written here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

log = logging.getLogger(__name__)

CURVE = ec.SECP384R1()
WEIGHT = "#weight"  # suffix of a tensor's weight slot
LIMB = "#limb"  # suffix of a tensor's finer limbs: name#limb1, name#limb2, ...


def limb_slot(name: str, k: int) -> str:
    """The masked slot of a tensor's limb k: the tensor's own name for limb 0."""
    return name if k == 0 else f"{name}{LIMB}{k}"


@dataclass(frozen=True)
class SecAggParams:
    """What every client of a round is told (`secure_aggregation` in the config, plus the round's
    public bound on the total weight)."""

    threshold: int
    neighbours: int
    clipping_range: float
    field_bits: int
    weight_bound: int  # the largest the summed weight of a tensor can be (the plan's sample bound)
    limbs: int = 1  # quantised limbs per value, each Q/2 times finer than the one before

    def effective_threshold(self, holders: int) -> int:
        """The shares that rebuild a secret: `threshold`, or every holder (the client and its
        neighbours) in a round too small for it (then no dropout is tolerated)."""
        return max(1, min(self.threshold, holders))

    @property
    def modulus(self) -> int:
        return 1 << self.field_bits

    @property
    def quantisation_range(self) -> int:
        """Q: the largest power of two for which a weighted sum of quantised values stays below
        the modulus, so nothing wraps, and at most 2^30 (Flower's quantiser rounds into int32).
        A power of two keeps every step a power of two when c is one (the default is 1.0): then
        two limbs carry a float32 value exactly (`quantise_in_limbs`)."""
        bound = max(2, min((self.modulus - 1) // max(1, self.weight_bound), 2**30))
        return 1 << (bound.bit_length() - 1)

    def limb_ranges(self) -> list[float]:
        """Each limb's clipping range: c, then twice the step of the limb before (what a limb
        leaves is within one of its steps; the factor two is room for float64's rounding of the
        first limb's input)."""
        ranges = [self.clipping_range]
        for _ in range(1, self.limbs):
            ranges.append(4 * ranges[-1] / self.quantisation_range)
        return ranges

    def limb_steps(self) -> list[float]:
        """Each limb's quantisation step, 2 range / Q: 2c / Q, then Q / 2 times finer each."""
        return [2 * r / self.quantisation_range for r in self.limb_ranges()]

    def resolution(self) -> float:
        """The last limb's step: the largest quantisation error of a mean."""
        return self.limb_steps()[-1]


@dataclass(frozen=True)
class RoundLayout:
    """The public plan of a round: which tensors (global shapes) each client sends, and the shape
    of each tensor's weight slot (a scalar, or the tensor's shape where some client sends a rank
    slice, whose coordinates are then covered by fewer clients)."""

    tensors: Mapping[int, tuple[str, ...]]
    shapes: Mapping[str, tuple[int, ...]]
    weight_shapes: Mapping[str, tuple[int, ...]]

    @property
    def clients(self) -> list[int]:
        return sorted(self.tensors)

    def slots(self, names: Sequence[str], limbs: int = 1) -> list[tuple[str, tuple[int, ...]]]:
        """The masked slots of these tensors, in one canonical order: each tensor (its first
        limb), its finer limbs, then its weight."""
        out = []
        for name in sorted(names):
            out.append((name, self.shapes[name]))
            out += [(limb_slot(name, k), self.shapes[name]) for k in range(1, limbs)]
            out.append((name + WEIGHT, self.weight_shapes[name]))
        return out


def full_update(
    deltas: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], to_full: Callable[[str, Any, Any], Any]
) -> dict[str, np.ndarray]:
    """A client's update as the protocol masks it: every tensor in its global shape (a rank slice
    zero-padded by the method's `to_full`) and, for a slice, `name#weight`: 1 where it covers."""
    import torch

    out = {}
    for name, delta in deltas.items():
        shape = torch.Size(shapes[name])
        out[name] = to_full(name, delta.double(), shape).numpy()
        if tuple(delta.shape) != tuple(shape):
            out[name + WEIGHT] = to_full(name, torch.ones(delta.shape, dtype=torch.float64), shape).numpy()
    return out


def secure_layout(
    shapes: Mapping[int, Mapping[str, tuple[int, ...]]], state: Mapping[str, Any]
) -> RoundLayout:
    """The round's public layout from the plan's upload shapes (client -> tensor -> shape sent) and
    the global tensors: a tensor's weight slot is per coordinate when some client sends a slice."""
    full = {name: tuple(state[name].shape) for per in shapes.values() for name in per}
    sliced = {name for per in shapes.values() for name, shape in per.items() if tuple(shape) != full[name]}
    return RoundLayout(
        {c: tuple(sorted(per)) for c, per in shapes.items()},
        full,
        {name: (shape if name in sliced else ()) for name, shape in full.items()},
    )


def ring_neighbours(clients: Sequence[int], neighbours: int) -> dict[int, list[int]]:
    """SecAgg+'s sparse graph: each client's neighbours are the `neighbours // 2` nearest on each
    side of a ring of the sorted ids (a symmetric relation, so an odd count acts as one less), or
    everyone else when the round has at most `neighbours + 1` clients."""
    ring = sorted(clients)
    n = len(ring)
    if neighbours >= n - 1:
        return {c: [d for d in ring if d != c] for c in ring}
    half = neighbours // 2
    return {
        c: sorted(
            (
                {ring[(i + k) % n] for k in range(1, half + 1)}
                | {ring[(i - k) % n] for k in range(1, half + 1)}
            )
            - {c}
        )
        for i, c in enumerate(ring)
    }


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(data)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def fresh_keys() -> tuple[dict[str, bytes], tuple[bytes, bytes]]:
    """A client's two fresh key pairs for one round: the private halves as `SecAggClient.restore`
    takes them, and the public halves it advertises (encryption, mask agreement)."""
    cipher, mask = ec.generate_private_key(CURVE), ec.generate_private_key(CURVE)
    return {"cipher": _private_bytes(cipher), "mask": _private_bytes(mask)}, (
        _public_bytes(cipher),
        _public_bytes(mask),
    )


def masks_for(
    seed: bytes, slots: Sequence[tuple[str, tuple[int, ...]]], modulus: int
) -> dict[str, np.ndarray]:
    """Flower's mask generator over these slots, in their order."""
    arrays = pseudo_rand_gen(seed, modulus, [shape for _, shape in slots])
    return {name: np.asarray(a, dtype=np.int64) for (name, _), a in zip(slots, arrays, strict=True)}


@contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    """Flower's stochastic quantiser draws from numpy's global generator: seed it for one call
    (so one run seed gives one result) and leave the caller's stream as it was."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


@dataclass
class SecAggClient:
    """One client's side of the protocol for one round."""

    client: int
    params: SecAggParams
    layout: RoundLayout
    neighbours: list[int]
    _cipher_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _mask_key: ec.EllipticCurvePrivateKey = field(init=False, repr=False)
    _seed: bytes = field(init=False, repr=False)
    _public: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _held: dict[int, tuple[bytes, bytes]] = field(
        default_factory=dict, repr=False
    )  # from -> (b share, sk share)

    def saved(self) -> dict[str, bytes]:
        """What this client must keep between the protocol's messages (a Flower ClientApp keeps
        it in its node's `context.state`): its private keys, its seed, the keys it was shown and
        the shares it holds."""
        out = {"cipher": _private_bytes(self._cipher_key), "mask": _private_bytes(self._mask_key)}
        if hasattr(self, "_seed"):
            out["seed"] = self._seed
        for c, (cipher, mask) in self._public.items():
            out[f"public.{c}.cipher"], out[f"public.{c}.mask"] = cipher, mask
        for c, (seed_share, key_share) in self._held.items():
            out[f"held.{c}.seed"], out[f"held.{c}.key"] = seed_share, key_share
        return out

    def restore(self, saved: Mapping[str, bytes]) -> None:
        """Take back what `saved` kept."""
        self._cipher_key, self._mask_key = _load_private(saved["cipher"]), _load_private(saved["mask"])
        if "seed" in saved:
            self._seed = saved["seed"]
        for key, value in saved.items():
            parts = key.split(".")
            if parts[0] == "public" and parts[2] == "cipher":
                self._public[int(parts[1])] = (value, saved[f"public.{parts[1]}.mask"])
            elif parts[0] == "held" and parts[2] == "seed":
                self._held[int(parts[1])] = (value, saved[f"held.{parts[1]}.key"])

    # 1. key advertisement
    def advertise_keys(self) -> tuple[bytes, bytes]:
        """Two fresh public keys: (encryption of shares, agreement of mask seeds)."""
        private, public = fresh_keys()
        self.restore(private)
        return public

    # 2. share keys
    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shares of the private mask seed and the mask secret key, one encrypted message per
        neighbour (keyed by the neighbour's id)."""
        self._public = {c: public_keys[c] for c in self.neighbours if c in public_keys}
        self._seed = os.urandom(32)
        holders = sorted([*self.neighbours, self.client])  # a client keeps one share itself, as in SecAgg+
        t = self.params.effective_threshold(len(holders))
        seed_shares = create_shares(self._seed, t, len(holders))
        key_shares = create_shares(_private_bytes(self._mask_key), t, len(holders))
        out = {}
        for j, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            if j == self.client:
                self._held[j] = (seed_share, key_share)
                continue
            if j not in self._public:
                continue
            key = generate_shared_key(self._cipher_key, _load_public(self._public[j][0]))
            out[j] = encrypt(key, share_keys_plaintext_concat(self.client, j, seed_share, key_share))
        return out

    # 3. masked input
    def masked_input(
        self,
        ciphertexts: Mapping[int, bytes],
        update: Mapping[str, np.ndarray],
        weight: int,
        quantise_seed: int,
    ) -> dict[str, np.ndarray]:
        """Keep the shares addressed to this client; send the quantised, weighted update and its
        weight, each slot masked (see the module docstring). `update` holds every tensor of this
        client's layout in the global shape (a rank slice zero-padded) and, for a tensor whose
        weight slot is not a scalar, `name#weight`: 1 where this client's slice covers."""
        for src, message in ciphertexts.items():
            key = generate_shared_key(self._cipher_key, _load_public(self._public[src][0]))
            origin, dest, seed_share, key_share = share_keys_plaintext_separate(decrypt(key, message))
            if origin != src or dest != self.client:
                raise ValueError(f"secure aggregation: a share from {src} names {origin} -> {dest}")
            self._held[src] = (seed_share, key_share)
        p, mine = self.params, self.layout.tensors[self.client]
        names = sorted(mine)
        clipped = sum(int(np.sum(np.abs(update[n]) > p.clipping_range)) for n in names)
        if clipped:  # only the client sees this: its own values are never sent in the clear
            log.warning(
                "secure aggregation: client %d clipped %d coordinates to +-%g (raise secure_aggregation.clipping_range)",
                self.client,
                clipped,
                p.clipping_range,
            )
        with _numpy_seeded(quantise_seed):
            limbs = quantise_in_limbs([np.asarray(update[n], dtype=np.float64) for n in names], p)
        masked: dict[str, np.ndarray] = {}
        for i, name in enumerate(names):
            cover = update.get(name + WEIGHT)
            slot_shape = self.layout.weight_shapes[name]
            for k, limb in enumerate(limbs):
                slot = limb_slot(name, k)
                masked[slot] = np.asarray(limb[i], dtype=np.int64) * weight
                if cover is not None:  # zero-padded coordinates carry no weight and no value
                    masked[slot] = masked[slot] * np.asarray(cover, dtype=np.int64)
            if cover is not None:
                masked[name + WEIGHT] = np.asarray(cover, dtype=np.int64) * weight
            else:
                masked[name + WEIGHT] = np.full(slot_shape, weight, dtype=np.int64)
        own = masks_for(self._seed, self.layout.slots(names, p.limbs), p.modulus)
        for slot in masked:
            masked[slot] = (masked[slot] + own[slot]) % p.modulus
        for j in self.neighbours:
            if j not in self._held or j == self.client:  # a neighbour that never shared its keys is left out
                continue
            both = sorted(set(names) & set(self.layout.tensors.get(j, ())))
            if not both:
                continue
            seed = generate_shared_key(self._mask_key, _load_public(self._public[j][1]))
            pair = masks_for(seed, self.layout.slots(both, p.limbs), p.modulus)
            sign = 1 if self.client < j else -1
            for slot, mask in pair.items():
                masked[slot] = (masked[slot] + sign * mask) % p.modulus
        return masked

    # 4. unmasking
    def unmask_shares(self, sent_input: Sequence[int], dropped: Sequence[int]) -> dict[int, bytes]:
        """For each neighbour that sent masked input, its share of b; for each that dropped after
        sharing keys, its share of the mask secret key."""
        out = {c: self._held[c][0] for c in sent_input if c in self._held}
        out |= {c: self._held[c][1] for c in dropped if c in self._held}
        return out


@dataclass(frozen=True)
class SkippedRound:
    """Why the server could not unmask: the clients it could not recover and their tensors."""

    clients: list[int]
    tensors: list[str]

    def describe(self) -> str:
        return (
            f"secure aggregation: fewer than threshold neighbours answered for clients {self.clients} "
            f"(tensors {', '.join(self.tensors[:4])}{', ...' if len(self.tensors) > 4 else ''}); round skipped"
        )


@dataclass
class SecAggServer:
    """The server's side: it routes messages and unmasks the sums; it never holds a plain update."""

    params: SecAggParams
    layout: RoundLayout
    neighbours: dict[int, list[int]]
    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # clients whose shares were routed
    inputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)

    def route_shares(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Sender -> {receiver: ciphertext} into receiver -> {sender: ciphertext}."""
        self.shared = set(shares)
        out: dict[int, dict[int, bytes]] = {c: {} for c in self.layout.clients}
        for src, messages in shares.items():
            for dst, ciphertext in messages.items():
                out.setdefault(dst, {})[src] = ciphertext
        return out

    def check_input(self, client: int, masked: Mapping[str, np.ndarray]) -> str | None:
        """What can be checked of a masked input: its slots and their shapes (the values are
        uniformly random to the server)."""
        expected = dict(self.layout.slots(self.layout.tensors[client], self.params.limbs))
        if set(masked) != set(expected):
            return f"sent slots {sorted(set(masked) ^ set(expected))[:3]} outside its plan"
        for slot, shape in expected.items():
            if tuple(np.shape(masked[slot])) != tuple(shape):
                return f"'{slot}' has shape {tuple(np.shape(masked[slot]))}, the plan says {tuple(shape)}"
        return None

    def dropped(self) -> list[int]:
        return sorted(self.shared - set(self.inputs))

    def unmask(
        self, answers: Mapping[int, Mapping[int, bytes]], current: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray] | SkippedRound:
        """For every tensor someone sent, its weighted mean (by coordinate where weights are per
        coordinate; where nothing was sent, `current`) and, under `name#weight`, the summed weight
        of each coordinate: all the server ever learns."""
        p = self.params
        senders, dropped = sorted(self.inputs), self.dropped()
        seeds: dict[int, bytes] = {}
        keys: dict[int, ec.EllipticCurvePrivateKey] = {}
        lost = []
        for c in senders + dropped:
            shares = [a[c] for a in answers.values() if c in a]
            needed = p.effective_threshold(len(self.neighbours[c]) + 1)
            if len(shares) < needed:
                lost.append(c)
                continue
            secret = combine_shares(shares[:needed])
            if c in self.inputs:
                seeds[c] = secret
            else:
                keys[c] = _load_private(secret)
        if lost:
            tensors = sorted({t for c in lost for t in self.layout.tensors.get(c, ())})
            return SkippedRound(lost, tensors)
        totals: dict[str, np.ndarray] = {}
        for masked in self.inputs.values():
            for slot, value in masked.items():
                totals[slot] = (totals.get(slot, 0) + value) % p.modulus
        for c in senders:  # private masks
            own = masks_for(seeds[c], self.layout.slots(self.layout.tensors[c], p.limbs), p.modulus)
            for slot, mask in own.items():
                totals[slot] = (totals[slot] - mask) % p.modulus
        for d in dropped:  # the dropped clients' pairwise masks in their neighbours' inputs
            for j in self.neighbours[d]:
                if j not in self.inputs:
                    continue
                both = sorted(set(self.layout.tensors[d]) & set(self.layout.tensors[j]))
                if not both:
                    continue
                seed = generate_shared_key(keys[d], _load_public(self.public_keys[j][1]))
                sign = 1 if j < d else -1  # j added sign(j, d) * mask; take it out
                for slot, mask in masks_for(seed, self.layout.slots(both, p.limbs), p.modulus).items():
                    totals[slot] = (totals[slot] - sign * mask) % p.modulus
        out = {}
        centre = p.quantisation_range // 2
        for name in sorted({s for s in totals if "#" not in s}):
            weight = totals[name + WEIGHT]
            covered = np.maximum(weight, 1).astype(np.float64)
            # limb k's sum is sum_i w_i (v_ik / step_k + Q/2), v_ik the part of x_i it carries:
            # centred in integers (exact), then divided and scaled. For one contributor every
            # step is exact, so a float32 value comes back as itself, as plain aggregation gives it.
            value = np.zeros(np.shape(totals[name]), dtype=np.float64)
            for k, step in enumerate(p.limb_steps()):
                centred = totals[limb_slot(name, k)] - weight * centre
                value = value + centred.astype(np.float64) / covered * step
            out[name] = np.where(weight > 0, value, np.asarray(current[name], dtype=np.float64))
            out[name + WEIGHT] = np.broadcast_to(weight.astype(np.float64), np.shape(out[name])).copy()
        return out


def quantise_in_limbs(values: Sequence[np.ndarray], p: SecAggParams) -> list[list[np.ndarray]]:
    """Flower's stochastic quantiser, once per limb: limb 0 quantises the values clipped to
    [-c, c], each next limb what the limbs before left (`limb_ranges`). Limb k's integers q carry
    (q - Q/2) * step_k. With c a power of two every step is one and each subtraction below is
    exact; a float32 value of at least 2^23 times the last step (2^-34 with the defaults) lies
    on the last limb's grid, so the last limb rounds nothing: two limbs carry such a value
    exactly, and the mean of one contributor is its value to the bit."""
    centre = p.quantisation_range // 2
    rest = [np.clip(v, -p.clipping_range, p.clipping_range) for v in values]
    limbs = []
    for r, step in zip(p.limb_ranges(), p.limb_steps(), strict=True):
        q = quantize(rest, r, p.quantisation_range)
        limbs.append(q)
        rest = [v - (np.asarray(qi, dtype=np.int64) - centre) * step for v, qi in zip(rest, q, strict=True)]
    return limbs


Dropout = Callable[[str, int], bool]
"""(stage, client) -> whether the client is gone before that stage ("share", "input", "unmask")."""


def secure_round(
    params: SecAggParams,
    layout: RoundLayout,
    updates: Mapping[int, Mapping[str, np.ndarray]],
    weights: Mapping[int, int],
    current: Mapping[str, np.ndarray],
    quantise_seed: Callable[[int], int],
    gone: Dropout | None = None,
    observe: Callable[[str, int, object], None] | None = None,
) -> tuple[dict[str, np.ndarray] | SkippedRound, dict[str, int]]:
    """The whole protocol in memory, for the in-process engine and tests (the Flower engine runs
    the same client and server steps as message rounds): the unmasked means, and the messages
    and bytes each stage moved. `observe(stage, client, payload)` sees every message the server
    receives ("keys", "shares", "input", "unmask"), as an eavesdropping server would."""
    gone = gone or (lambda stage, client: False)
    graph = ring_neighbours(layout.clients, params.neighbours)
    clients = {c: SecAggClient(c, params, layout, graph[c]) for c in layout.clients}
    server = SecAggServer(params, layout, graph)
    traffic = {"messages": 0, "bytes": 0}

    def sent(stage: str, client: int, payload: object) -> None:
        traffic["messages"] += 1
        traffic["bytes"] += _size(payload)
        if observe is not None:
            observe(stage, client, payload)

    for c, client in clients.items():
        server.public_keys[c] = client.advertise_keys()
        sent("keys", c, server.public_keys[c])
    shares = {}
    for c, client in clients.items():
        if gone("share", c):
            continue
        visible = {j: server.public_keys[j] for j in graph[c]}
        shares[c] = client.share_keys(visible)
        sent("shares", c, shares[c])
    routed = server.route_shares(shares)
    for c in sorted(shares):
        if gone("input", c):
            continue
        masked = clients[c].masked_input(routed.get(c, {}), updates[c], weights[c], quantise_seed(c))
        problem = server.check_input(c, masked)
        if problem is not None:  # left out, as a client that dropped before its input
            log.warning("secure aggregation: client %d %s; left out", c, problem)
            continue
        server.inputs[c] = masked
        sent("input", c, masked)
    answers = {}
    for c in sorted(shares):
        if gone("unmask", c):
            continue
        answers[c] = clients[c].unmask_shares(sorted(server.inputs), server.dropped())
        sent("unmask", c, answers[c])
    return server.unmask(answers, current), traffic


def _size(payload: object) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    if isinstance(payload, np.ndarray):
        return int(payload.nbytes)
    if isinstance(payload, Mapping):
        return sum(_size(v) for v in payload.values())
    if isinstance(payload, tuple | list):
        return sum(_size(v) for v in payload)
    return 8
