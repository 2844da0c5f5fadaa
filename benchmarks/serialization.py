"""Serialization of a client update: the float32 update vector to bytes and
back, against ``numpy.frombuffer`` and a plain tensor copy, in the same run.

Methods, each an encode (tensor → bytes) and a decode (bytes → tensor):

* **raw** (the reference): ``tensor.numpy().tobytes()`` and
  ``torch.from_numpy(numpy.frombuffer(...))``: one copy out, none back;
* **Flower message (deployment)**: what ``fedtrain.transport.flower`` sends:
  ``ArrayRecord({"update": Array(ndarray)})`` serialized to its protobuf wire
  bytes (``array_record_to_proto(...).SerializeToString()``), and back with
  ``ProtoArrayRecord.FromString``, ``array_record_from_proto``,
  ``Array.numpy()`` and ``torch.from_numpy``;
* **torch.save / torch.load** to and from an in-memory buffer;
* **pickle** (protocol 5) of the numpy array.

Also ``Tensor.copy_`` of the same bytes into a preallocated tensor (the
memory-bandwidth reference). Sizes: 100k, 1M and 10M parameters. Each
timing is the minimum over repeats (other processes share the cores); GB/s
counts the vector's bytes once. Ratios: round trip / raw round trip, and
round trip / ``copy_``.

    python benchmarks/serialization.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import pickle
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from _common import best_seconds, report, revision, table


@dataclass(frozen=True)
class Method:
    """An encode and a decode of a float32 vector."""

    name: str
    encode: Callable[[torch.Tensor], bytes]
    decode: Callable[[bytes], torch.Tensor]


def _raw() -> Method:
    return Method("raw: tobytes + numpy.frombuffer (reference)", lambda t: t.numpy().tobytes(),
                  lambda b: torch.from_numpy(np.frombuffer(b, dtype=np.float32)))


def _flower() -> Method:
    from flwr.app import Array, ArrayRecord
    from flwr.common.serde import ProtoArrayRecord, array_record_from_proto, array_record_to_proto

    def encode(t: torch.Tensor) -> bytes:
        record = ArrayRecord({"update": Array(np.ascontiguousarray(t.numpy(), dtype=np.float32))})
        return array_record_to_proto(record).SerializeToString()

    def decode(b: bytes) -> torch.Tensor:
        record = array_record_from_proto(ProtoArrayRecord.FromString(b))
        return torch.from_numpy(np.ascontiguousarray(record["update"].numpy()))

    return Method("Flower ArrayRecord protobuf (deployment)", encode, decode)


def _torch_save() -> Method:
    def encode(t: torch.Tensor) -> bytes:
        buf = io.BytesIO()
        torch.save(t, buf)
        return buf.getvalue()

    return Method("torch.save / torch.load", encode, lambda b: torch.load(io.BytesIO(b), weights_only=True))


def _pickle() -> Method:
    return Method("pickle protocol 5 (numpy)", lambda t: pickle.dumps(t.numpy(), protocol=5),
                  lambda b: torch.from_numpy(pickle.loads(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes up to 1M, 3 repeats: a smoke run")
    ap.add_argument("--repeats", type=int, default=0, help="timings per method (default 15, quick 3)")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 15)
    sizes = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    torch.set_num_threads(1)
    methods = [_raw(), _flower(), _torch_save(), _pickle()]
    rows: list[list[object]] = []
    for numel in sizes:
        vector = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        nbytes = vector.numel() * vector.element_size()
        target = torch.empty_like(vector)
        t_copy = best_seconds(lambda: target.copy_(vector), repeats)
        t_raw = 0.0
        for method in methods:
            blob = method.encode(vector)
            back = method.decode(blob)
            if not torch.equal(back, vector):
                raise RuntimeError(f"{method.name}: the decoded vector differs from the encoded one")
            t_enc = best_seconds(lambda: method.encode(vector), repeats)
            t_dec = best_seconds(lambda: method.decode(blob), repeats)
            trip = t_enc + t_dec
            if not t_raw:
                t_raw = trip
            rows.append([
                f"{numel:,}", method.name, f"{len(blob) / nbytes:.4f}",
                f"{nbytes / t_enc / 1e9:.2f}", f"{nbytes / t_dec / 1e9:.2f}", f"{trip * 1e3:.3f}",
                f"**{trip / t_raw:.2f}**", f"{trip / t_copy:.1f}",
            ])
            print(rows[-1], flush=True)
        rows.append([f"{numel:,}", "Tensor.copy_ (bandwidth reference)", "—", "—", "—", f"{t_copy * 1e3:.3f}",
                     f"{t_copy / t_raw:.2f}", "1"])
    report(
        "serialization" + ("_quick" if args.quick else ""),
        "Serialization of a float32 update vector vs numpy.frombuffer" + (" (--quick)" if args.quick else ""),
        table(["parameters", "method", "bytes / raw bytes", "encode GB/s", "decode GB/s", "round trip ms",
               "round trip / raw", "round trip / copy_"], rows),
        [revision(), f"min of {repeats} timings per step; 1 torch thread; GB/s counts the vector's bytes once",
         "raw decode (numpy.frombuffer + torch.from_numpy) copies nothing: it is a view of the bytes"],
    )


if __name__ == "__main__":
    main()
