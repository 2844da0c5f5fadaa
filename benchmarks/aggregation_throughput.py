"""Throughput of ``fedtrain.weighted_mean``, the FedAvg reduction, against a
plain memory copy of the same bytes in the same run.

Two layouts of ``n`` client updates of ``P`` float32 values:

* **rows of one buffer**: the vectors are consecutive rows of one
  preallocated ``(n, P)`` tensor, as ``SequentialExecutor`` writes them, so
  ``fedtrain.stack`` returns a view and the reduction is one ``w @ X``;
* **separate tensors**: each vector allocated on its own, so ``stack`` copies
  them into a fresh ``(n, P)`` matrix first.

Reference: ``dst.copy_(src)`` of an ``(n, P)`` float32 buffer. GB/s = n*P*4 /
seconds for all three (bytes of updates read; the copy also writes as many).
Each timing is the minimum of several repeats (noise from other processes
only adds time); measured with ``torch.set_num_threads(1)`` and with torch's
default thread count. Target: aggregation / copy >= 50%.

    python benchmarks/aggregation_throughput.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse

import torch

from _common import best_seconds, report, table
from fedtrain import ClientUpdate, weighted_mean

TARGET = 0.5


def updates_of(vectors: list[torch.Tensor]) -> list[ClientUpdate]:
    return [ClientUpdate(client_id=str(i), vector=v, num_examples=10 + i) for i, v in enumerate(vectors)]


def measure(n: int, p: int, repeats: int) -> list[list[object]]:
    gb = n * p * 4 / 1e9
    buf = torch.randn(n, p)
    dst = torch.empty_like(buf)
    rows = updates_of(list(buf.unbind(0)))
    separate = updates_of([torch.randn(p) for _ in range(n)])
    # results must agree: the view path and the copy path compute the same sum
    check = updates_of([buf[i].clone() for i in range(n)])
    torch.testing.assert_close(weighted_mean(rows), weighted_mean(check))
    copy_s = best_seconds(lambda: dst.copy_(buf), repeats)
    out = []
    for label, ups in (("rows of one buffer (view)", rows), ("separate tensors (stack copy)", separate)):
        agg_s = best_seconds(lambda: weighted_mean(ups), repeats)
        ratio = copy_s / agg_s
        out.append([
            torch.get_num_threads(), n, f"{p:,}", label, gb / agg_s, gb / copy_s,
            f"**{ratio:.0%}**", "yes" if ratio >= TARGET else "NO",
        ])
    del buf, dst, rows, separate, check
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="P = 256k, 3 repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=0, help="timings per measurement (default 10, quick 3)")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 10)
    p = 262_144 if args.quick else 1_000_000
    default_threads = torch.get_num_threads()
    rows: list[list[object]] = []
    for threads in (1, default_threads):
        torch.set_num_threads(threads)
        for n in (10, 100):
            rows += measure(n, p, repeats)
    torch.set_num_threads(default_threads)
    header = ["threads", "n", "P", "update layout", "weighted_mean GB/s", "copy_ GB/s",
              "aggregation / copy", f">= {TARGET:.0%}"]
    report(
        "aggregation_throughput" + ("_quick" if args.quick else ""),
        "weighted_mean vs Tensor.copy_" + (" (--quick)" if args.quick else ""),
        table(header, rows),
        [
            f"GB/s = n*P*4 bytes / best of {repeats} timings; copy_ reads the same n*P*4 bytes "
            "and writes as many",
            f"threads {default_threads} = torch's default here; float32; weights by num_examples",
        ],
    )


if __name__ == "__main__":
    main()
