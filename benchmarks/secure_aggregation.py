"""Cost of one SecAgg+ round (``fedtrain.secure``) against plain aggregation
of the same updates, in the same run.

For ``n`` = 10, 50 and 100 clients per round and a vector of ``P`` = 1M
parameters (a 1M-parameter model's update), the protocol's state machines
are driven in process, every call timed with ``time.process_time`` (CPU
seconds of this process; numpy and ``cryptography`` run single-threaded
here):

* **client CPU s**: one client's four stages (advertise, share keys, masked
  input, unmask), mean over the clients;
* **coordinator CPU s**: the four ``collect_*`` stages, unmasking included;
* **bytes sent per client**: :func:`fedtrain.secure.messages.wire_bytes` of
  its four messages (payload, no framing).

Reference, same run: plain aggregation, where each client sends its float32
update (``4·P`` bytes, no client-side work) and the coordinator computes
``fedtrain.weighted_mean`` over the ``n`` updates in one buffer. Ratios are
secure / plain. The SecAgg+ graph has the default degree ``k ≈ 3·log₂ n``; a
row with the complete graph (``k = n − 1``, Bonawitz et al. 2017's SecAgg) at
the largest ``n`` shows what the sparse graph saves, and a row with 10%
dropouts after key sharing shows the coordinator's cost of reconstructing
their pairwise masks. A client's cost is ``k + 1`` mask expansions of ``P``
ring elements plus ``O(k)`` key agreements, so "client CPU / (k+1)" staying
flat while ``k`` grows as ``log n`` is the O(log n) claim.

    python benchmarks/secure_aggregation.py [--quick]
"""

from __future__ import annotations

import argparse
import secrets
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

from _common import report, revision, table
from fedtrain import ClientUpdate, weighted_mean
from fedtrain.secure.graph import NeighbourGraph, default_degree, threshold_for
from fedtrain.secure.messages import SecureSetup, wire_bytes
from fedtrain.secure.protocol import SecureClient, SecureServer

T = TypeVar("T")


@dataclass(frozen=True)
class Cost:
    label: str
    n: int
    degree: int
    dropped: int
    client_cpu: float
    server_cpu: float
    client_bytes: float
    plain_server_cpu: float
    plain_bytes: int
    correct: bool


def cpu(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


def plain_cost(updates: torch.Tensor, weights: list[int], repeats: int = 3) -> float:
    ups = [ClientUpdate(str(i), updates[i], w) for i, w in enumerate(weights)]
    weighted_mean(ups)
    return min(cpu(lambda: weighted_mean(ups))[1] for _ in range(repeats))


def secure_cost(label: str, n: int, p: int, degree: int, drop_fraction: float, seed: int) -> Cost:
    rng = np.random.default_rng(seed)
    updates = torch.from_numpy(rng.uniform(-0.1, 0.1, (n, p)).astype(np.float32))
    weights = rng.integers(1, 1001, n).tolist()
    setup = SecureSetup(secrets.token_bytes(16), n, p, 32, 8.0, 1000, threshold_for(degree, 0.5))
    server = SecureServer(setup, NeighbourGraph.harary(n, degree))
    clients = [SecureClient(i, setup) for i in range(n)]
    client_cpu = np.zeros(n)
    client_bytes = np.zeros(n)

    def each(ids: list[int], step: Callable[[SecureClient], T]) -> list[T]:
        out = []
        for i in ids:
            message, seconds = cpu(lambda: step(clients[i]))
            client_cpu[i] += seconds
            client_bytes[i] += wire_bytes(message)
            out.append(message)
        return out

    everyone = list(range(n))
    dropped = set(rng.choice(n, int(drop_fraction * n), replace=False).tolist())
    survivors = [i for i in everyone if i not in dropped]
    server_cpu = 0.0
    neighbourhoods, s = cpu(lambda: server.collect_adverts(each(everyone, lambda c: c.advertise())))
    server_cpu += s
    deliveries, s = cpu(lambda: server.collect_shares(each(everyone, lambda c: c.share_keys(neighbourhoods[c.index]))))
    server_cpu += s
    masked = each(survivors, lambda c: c.masked_input(deliveries[c.index], updates[c.index].numpy(), weights[c.index]))
    requests, s = cpu(lambda: server.collect_masked(masked))
    server_cpu += s
    del masked
    responses = each(survivors, lambda c: c.unmask(requests[c.index]))
    result, s = cpu(lambda: server.collect_unmask(responses))
    server_cpu += s
    keep = torch.tensor(survivors)
    w = torch.tensor([weights[i] / 1000 for i in survivors], dtype=torch.float64)
    expected = (w @ updates[keep].double()).numpy()
    correct = bool(np.abs(result.total - expected).max() <= setup.quantizer.sum_error_bound(len(survivors)) + 1e-9)
    return Cost(
        label, n, degree, len(dropped),
        float(client_cpu[survivors].mean()), server_cpu, float(client_bytes[survivors].mean()),
        plain_cost(updates, weights), 4 * p, correct,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="P = 100k: a smoke run")
    args = ap.parse_args()
    p = 100_000 if args.quick else 1_000_000
    torch.set_num_threads(1)
    started = time.perf_counter()
    secure_cost("warm-up", 5, 1000, 4, 0.2, seed=0)
    costs: list[Cost] = []
    for n in (10, 50, 100):
        costs.append(secure_cost("SecAgg+", n, p, default_degree(n), 0.0, seed=n))
    largest = 100
    costs.append(secure_cost("SecAgg+, 10% drop after sharing", largest, p, default_degree(largest), 0.1, seed=1))
    costs.append(secure_cost("SecAgg (complete graph)", largest, p, largest - 1, 0.0, seed=2))
    rows = [
        [
            c.label, c.n, c.degree, c.dropped,
            f"{c.client_cpu:.3f}", f"{c.client_cpu / (c.degree + 1) * 1e3:.2f}",
            f"{c.server_cpu:.2f}", f"{c.plain_server_cpu:.4f}", f"{c.server_cpu / c.plain_server_cpu:.0f}×",
            f"{c.client_bytes / 1e6:.3f}", f"{c.client_bytes / c.plain_bytes:.4f}",
            "yes" if c.correct else "NO",
        ]
        for c in costs
    ]
    header = [
        "protocol", "n", "degree k", "dropped", "client CPU s", "client CPU ms / (k+1)",
        "coordinator CPU s", "plain coordinator CPU s", "coordinator secure / plain",
        "MB sent per client", "bytes secure / plain (4P)", "sum within bound",
    ]
    report(
        "secure_aggregation" + ("_quick" if args.quick else ""),
        f"SecAgg+ round cost vs plain aggregation, P = {p:,}" + (" (--quick)" if args.quick else ""),
        table(header, rows),
        [
            revision(),
            "client CPU: mean over surviving clients of its four stages (process_time); plain clients do no "
            "protocol work, so the client reference is the training itself (not measured here)",
            "coordinator CPU: the four collect_* stages, including mask reconstruction and unmasking; "
            "plain: weighted_mean over the n float32 updates in one buffer (best of 3)",
            "bytes: wire_bytes of advert, shared keys, masked input (4·(P+1), 32-bit ring) and unmask "
            "response; plain sends 4·P bytes",
            "ring Z_2^32, clip range 8, max weight 1000, threshold floor(k/2)+1",
            f"total wall time {time.perf_counter() - started:.0f} s",
        ],
    )


if __name__ == "__main__":
    main()
