"""Dividing the training examples among federated clients (IID, Dirichlet label skew, pathological).

All functions take labels (one int per training example) and return one index array per client:
every index goes to exactly one client. Randomness comes only from the generator passed in, and
`partition_indices` derives that generator from the run's seed, so a partition is a pure function
of (labels, config, seed): nothing is cached on disk that could silently override the settings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhello.config import PartitionConfig
from fedhello.data.sources import allocate_counts
from fedhello.errors import UserError
from fedhello.seeding import Stream, numpy_rng

MAX_DIRICHLET_ATTEMPTS = 100


def partition_indices(
    labels: np.ndarray,
    cfg: PartitionConfig,
    seed: int,
    domains: np.ndarray | None = None,
    domain_names: list[str] | None = None,
) -> list[np.ndarray]:
    """The partition `cfg` describes; each client's indices sorted ascending (int64).

    `domains` (one id per example, naming `domain_names`) is needed by the domain scheme only."""
    labels = np.asarray(labels)
    rng = numpy_rng(seed, Stream.PARTITION)  # == default_rng(SeedSequence([seed, 1001]))
    if cfg.scheme == "domain":
        if domains is None or domain_names is None:
            raise UserError(
                "partition.scheme: 'domain' needs data with domains (source domain_folder, "
                "data.domain_column, or several data.language)"
            )
        counts = domain_client_counts(domains, domain_names, cfg)
        parts = partition_domains(labels, domains, counts, cfg.within_domain, cfg.alpha, rng)
    elif cfg.scheme == "iid":
        parts = partition_iid(labels, cfg.num_clients, rng)
    elif cfg.scheme == "dirichlet":
        parts = partition_dirichlet(labels, cfg.num_clients, cfg.alpha, rng)
    else:
        parts = partition_pathological(
            labels, cfg.num_clients, cfg.classes_per_client, cfg.beta, cfg.min_per_share, rng
        )
    return [np.sort(p).astype(np.int64) for p in parts]


def partition_iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal random shares: client sizes differ by at most one."""
    n = len(labels)
    _check_enough(n, num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label skew: each class is split across all clients with Dirichlet(alpha) proportions.

    Small alpha (0.1) gives each client a few dominant classes; large alpha approaches IID. A draw
    that leaves some client with fewer than `min_size` examples is redrawn (a bounded number of times).
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_enough(n, num_clients * max(min_size, 1))
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                shares[client].append(piece)
        parts = [np.sort(np.concatenate(s)).astype(np.int64) for s in shares]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise UserError(
        f"partition.alpha: could not give each of {num_clients} clients at least {min_size} examples "
        f"with alpha={alpha} in {MAX_DIRICHLET_ATTEMPTS} draws; raise partition.alpha or lower "
        "partition.num_clients"
    )


def partition_pathological(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: int,
    beta: float,
    min_per_share: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The paper's "pat_k_dir": each client holds k classes, with Dirichlet(beta) quantities.

    Classes are dealt to clients from a reshuffled class sequence, so each class goes to about
    K*k/C clients and no client gets a class twice. Each class's examples are then split among its
    holders: `min_per_share` each first (less, evenly, if the class is too small), the rest with
    Dirichlet(beta) proportions.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k = classes_per_client
    if k > len(classes):
        raise UserError(
            f"partition.classes_per_client: {k} but the training data has only {len(classes)} classes"
        )
    if num_clients * k < len(classes):
        raise UserError(
            f"partition.classes_per_client: {num_clients} clients x {k} classes cannot hold all "
            f"{len(classes)} classes; raise partition.classes_per_client or partition.num_clients"
        )
    _check_enough(len(labels), num_clients)

    holders = _deal_classes(len(classes), num_clients, k, rng)
    shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for class_pos, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        owners = holders[class_pos]
        sizes = _share_sizes(len(idx), len(owners), beta, min_per_share, rng)
        for client, piece in zip(owners, np.split(idx, np.cumsum(sizes)[:-1]), strict=True):
            shares[client].append(piece)
    return [np.sort(np.concatenate(s)).astype(np.int64) if s else np.zeros(0, dtype=np.int64) for s in shares]


def domain_client_counts(domains: np.ndarray, domain_names: list[str], cfg: PartitionConfig) -> np.ndarray:
    """Clients per domain id: as `cfg.domain_clients` says, else in proportion to the domains'
    sizes with at least one client each."""
    sizes = np.bincount(np.asarray(domains, dtype=np.int64), minlength=len(domain_names))
    present = np.flatnonzero(sizes)
    if cfg.domain_clients is not None:
        unknown = sorted(set(cfg.domain_clients) - set(domain_names))
        if unknown:
            raise UserError(
                f"partition.domain_clients: unknown domain '{unknown[0]}' (domains: {', '.join(domain_names)})"
            )
        counts = np.array([cfg.domain_clients.get(name, 0) for name in domain_names], dtype=np.int64)
        if counts.min(initial=0) < 0 or counts.sum() != cfg.num_clients:
            raise UserError(
                f"partition.domain_clients: counts must be >= 0 and sum to partition.num_clients "
                f"({cfg.num_clients}), got {int(counts.sum())}"
            )
        starved = [domain_names[d] for d in present if counts[d] == 0]
        if starved:
            raise UserError(f"partition.domain_clients: domain '{starved[0]}' has data but no clients")
        return counts
    if cfg.num_clients < len(present):
        raise UserError(
            f"partition.num_clients: {cfg.num_clients} clients cannot cover {len(present)} domains "
            "(one client per domain at least)"
        )
    counts = np.zeros(len(domain_names), dtype=np.int64)
    counts[present] = allocate_counts(cfg.num_clients, sizes[present], sizes[present])
    while (counts[present] == 0).any():  # a small domain still gets a client, from the largest
        counts[present[np.argmin(counts[present])]] += 1
        counts[np.argmax(counts)] -= 1
    return counts


def partition_domains(
    labels: np.ndarray,
    domains: np.ndarray,
    clients_per_domain: np.ndarray,
    within: str,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Feature skew: client k draws all its data from one domain. Clients are numbered domain by
    domain (domain 0's clients first); inside a domain the examples are split IID or with
    Dirichlet(alpha) label skew."""
    labels = np.asarray(labels)
    domains = np.asarray(domains)
    parts: list[np.ndarray] = []
    for d, k in enumerate(clients_per_domain):
        if k == 0:
            continue
        idx = np.flatnonzero(domains == d)
        if within == "dirichlet":
            pieces = partition_dirichlet(labels[idx], int(k), alpha, rng)
        else:
            pieces = partition_iid(labels[idx], int(k), rng)
        parts.extend(idx[p] for p in pieces)
    return parts


def _deal_classes(num_classes: int, num_clients: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    """For each class position, the clients holding it.

    Clients take classes in turn from a queue of reshuffled class sequences; a client skips a class
    it already holds (it stays at the front for the next client). The queue only grows by a fresh
    permutation when needed, so class counts stay within about one of K*k/C.
    """
    queue: list[int] = []
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for client in range(num_clients):
        held: set[int] = set()
        while len(held) < k:
            pos = next((i for i, c in enumerate(queue) if c not in held), None)
            if pos is None:
                queue.extend(int(c) for c in rng.permutation(num_classes))
                continue
            c = queue.pop(pos)
            held.add(c)
            holders[c].append(client)
    return holders


def _share_sizes(
    n: int, holders: int, beta: float, min_per_share: int, rng: np.random.Generator
) -> np.ndarray:
    """Sizes of `holders` shares of `n` examples: a guaranteed minimum, the rest Dirichlet(beta)."""
    minimum = min(min_per_share, n // holders)
    rest = n - minimum * holders
    proportions = rng.dirichlet(np.full(holders, beta))
    cuts = (np.cumsum(proportions) * rest).astype(np.int64)
    cuts[-1] = rest  # guard against float round-off: every example is handed out
    extra = np.diff(np.concatenate([[0], cuts]))
    return (minimum + extra).astype(np.int64)


def _check_enough(n: int, needed: int) -> None:
    if n < needed:
        raise UserError(f"partition.num_clients: {n} training examples are too few (need at least {needed})")


def describe_partition(
    labels: np.ndarray,
    parts: list[np.ndarray],
    label_names: list[str],
    domains: np.ndarray | None = None,
    domain_names: list[str] | None = None,
) -> dict[str, Any]:
    """Per-client sizes and class histograms (plain ints, JSON-ready) for logs and reports; with
    domains, each client's domain too (the most frequent one, which is its only one under the
    domain scheme)."""
    labels = np.asarray(labels)
    num_classes = len(label_names)
    clients: list[dict[str, Any]] = []
    sizes: list[int] = []
    class_totals = np.zeros(num_classes, dtype=np.int64)
    for i, p in enumerate(parts):
        hist = np.bincount(labels[p], minlength=num_classes)
        class_totals += hist
        sizes.append(len(p))
        row: dict[str, Any] = {"client": i, "size": len(p)}
        if domains is not None and domain_names is not None:
            held = np.bincount(np.asarray(domains)[p], minlength=len(domain_names))
            row["domain"] = domain_names[int(np.argmax(held))] if len(p) else ""
        row["num_classes"] = int(np.count_nonzero(hist))
        row["histogram"] = [int(x) for x in hist]
        clients.append(row)
    return {
        "num_clients": len(parts),
        "label_names": list(label_names),
        "total": sum(sizes),
        "size_min": min(sizes, default=0),
        "size_max": max(sizes, default=0),
        "class_totals": [int(x) for x in class_totals],
        "clients": clients,
    }


def format_partition_table(description: dict[str, Any], label_names: list[str]) -> str:
    """A fixed-width text table: one row per client with its size (and domain) and examples per class.

    Class columns are numbered (a legend lists the names) so the table stays narrow; with many
    classes only each client's largest classes are listed.
    """
    clients = description["clients"]
    many = len(label_names) > 12
    size_w = max(4, len(str(description["total"])))
    dom_w = max([0, *(len(c["domain"]) for c in clients if "domain" in c)])
    dom_w = max(dom_w, 6) if dom_w else 0

    def lead(client: object, size: object, domain: str, classes: object) -> str:
        middle = f" {domain:<{dom_w}}" if dom_w else ""
        return f"{client:>6} {size:>{size_w}}{middle} {classes:>3}"

    lines = [f"{len(clients)} clients, {description['total']} examples"]
    if many:
        lines.append(lead("client", "size", "domain", "cls") + "  largest classes")
        for c in clients:
            hist = np.asarray(c["histogram"])
            top = np.argsort(-hist, kind="stable")[:5]
            listed = ", ".join(f"{label_names[j]}:{hist[j]}" for j in top if hist[j] > 0)
            lines.append(lead(c["client"], c["size"], c.get("domain", ""), c["num_classes"]) + f"  {listed}")
        return "\n".join(lines)

    col_w = max([3, *(len(str(x)) for x in description["class_totals"])])
    header = " ".join(f"{j:>{col_w}}" for j in range(len(label_names)))
    lines.append(lead("client", "size", "domain", "cls") + f" | {header}")
    for c in clients:
        row = " ".join(f"{x:>{col_w}}" for x in c["histogram"])
        lines.append(lead(c["client"], c["size"], c.get("domain", ""), c["num_classes"]) + f" | {row}")
    totals = " ".join(f"{x:>{col_w}}" for x in description["class_totals"])
    lines.append(lead("total", description["total"], "", "") + f" | {totals}")
    lines.append("classes: " + ", ".join(f"{j}={name}" for j, name in enumerate(label_names)))
    return "\n".join(lines)
