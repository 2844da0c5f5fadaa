"""Who shares masks and secrets with whom: SecAgg+'s sparse neighbourhood graph.

SecAgg (Bonawitz et al. 2017) pairs every client with every other one: each
client does ``n − 1`` key agreements and mask expansions, O(n) per client and
O(n²) for the coordinator. SecAgg+ (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead") shows that a random graph of
degree ``k = Θ(log n)`` keeps the same guarantees (against a semi-honest
coordinator colluding with a bounded fraction of clients, with a bounded
fraction of dropouts, except with negligible probability), making a client's
cost O(log n · P).

fedtrain uses their Harary-graph construction with a random relabelling:
clients are placed on a ring in a uniformly random order and each is linked
with the ``k/2`` nearest on either side. The order comes from
``secrets.SystemRandom``: it changes no result, and a predictable graph would
let colluding clients plan to surround a victim.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

DEGREE_FACTOR = 3.0
"""Default degree ``k ≈ 3·log₂ n`` (rounded up to even). Bell et al. 2020 prove
``k = Θ(log n)`` suffices; the constant is ours: it gives complete graphs up to
``n = 10``, ``k = 18`` at 50 and ``k = 20`` at 100 clients."""


def default_degree(num_clients: int) -> int:
    """``min(n − 1, 2·⌈1.5·log₂ n⌉)``: logarithmic, even, at most complete."""
    if num_clients < 2:
        return max(0, num_clients - 1)
    half = math.ceil(DEGREE_FACTOR / 2.0 * math.log2(num_clients))
    return min(num_clients - 1, 2 * half)


def threshold_for(degree: int, fraction: float) -> int:
    """Shamir threshold ``t = min(k, ⌊fraction·k⌋ + 1)``: with ``fraction ≥ 0.5``,
    more than half of a client's neighbours, so the coordinator cannot hear
    both a survivor's seed and its mask key from the honest majority of its
    neighbours (Bell et al. 2020, §3; Bonawitz et al. 2017, §4)."""
    if degree < 1:
        raise ValueError(f"degree = {degree}: must be >= 1")
    if not 0.5 <= fraction <= 1.0:
        raise ValueError(f"threshold fraction = {fraction}: must be in [0.5, 1]")
    return min(degree, math.floor(fraction * degree) + 1)


@dataclass(frozen=True)
class NeighbourGraph:
    """An undirected graph on clients ``0 … n−1``: ``neighbours[i]`` are the
    clients ``i`` masks with and shares its secrets among (never ``i`` itself)."""

    neighbours: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.neighbours)
        for i, ns in enumerate(self.neighbours):
            for j in ns:
                if not 0 <= j < n or j == i or i not in self.neighbours[j]:
                    raise ValueError(f"neighbours[{i}] = {ns}: must name other clients, symmetrically")

    @property
    def size(self) -> int:
        return len(self.neighbours)

    @property
    def min_degree(self) -> int:
        """The fewest neighbours any client has: the degree the Shamir
        threshold must be computed from (every client must be able to hand
        out ``t`` shares)."""
        return min((len(ns) for ns in self.neighbours), default=0)

    @property
    def max_degree(self) -> int:
        """The most neighbours any client has: ``t`` must exceed half of it."""
        return max((len(ns) for ns in self.neighbours), default=0)

    @classmethod
    def complete(cls, num_clients: int) -> "NeighbourGraph":
        return cls(tuple(tuple(j for j in range(num_clients) if j != i) for i in range(num_clients)))

    @classmethod
    def harary(cls, num_clients: int, degree: int) -> "NeighbourGraph":
        """Bell et al.'s ``H(k, n)`` under a random relabelling; complete when
        ``degree ≥ n − 1``. An odd ``degree`` below ``n − 1`` is raised by one,
        so the result is regular but its degree may exceed the one asked for:
        derive the threshold from :attr:`min_degree` of the graph built, never
        from ``degree``."""
        if num_clients < 1:
            raise ValueError(f"num_clients = {num_clients}: must be >= 1")
        if degree < 1:
            raise ValueError(f"degree = {degree}: must be >= 1")
        if degree >= num_clients - 1:
            return cls.complete(num_clients)
        half = (degree + 1) // 2
        order = list(range(num_clients))
        secrets.SystemRandom().shuffle(order)
        position = {client: p for p, client in enumerate(order)}
        links: list[set[int]] = [set() for _ in range(num_clients)]
        for client in range(num_clients):
            p = position[client]
            for offset in range(1, half + 1):
                for q in (p + offset, p - offset):
                    other = order[q % num_clients]
                    if other != client:
                        links[client].add(other)
                        links[other].add(client)
        return cls(tuple(tuple(sorted(s)) for s in links))
