"""Serialization of a client update: the float32 update vector to bytes and
back, against ``numpy.frombuffer`` and a plain tensor copy, in the same run.

Methods, each an encode (tensor → bytes) and a decode (bytes → tensor):

* **raw** (the reference): ``tensor.numpy().tobytes()`` and
  ``torch.from_numpy(numpy.frombuffer(...))``: one copy out, none back;
* **fedtrain's wire encoding**: what ``fedtrain.transport.flower`` puts in and
  takes out of Flower's record: :func:`~fedtrain.transport.flower.float32_array`
  (raw little-endian bytes in an ``Array``) and back through
  :func:`~fedtrain.transport.flower.parse_train_reply` (every field checked)
  into a preallocated row, as the coordinator's sink does;
* **Flower's deployment path**, with fedtrain's raw ``Array`` and, for the
  before/after comparison, with the ``.npy`` ``Array`` fedtrain sent before
  issue 17: the record deflated into Flower 1.42's content-addressed objects
  (5 MiB ``ArrayChunk`` objects, each named by its SHA-256: what ``Grid.push_messages``
  and the SuperNode push) and inflated back from them
  (``inflate_object_from_contents``: what a pull does), plus the encoding on
  either side; the network itself is not in it;
* **SHA-256 of the bytes** (``hashlib``): the floor of Flower's path, which
  names every object by its hash;
* **Flower ``ArrayRecord`` protobuf (legacy serde)**: what this benchmark
  measured before issue 17 as the deployment path (``array_record_to_proto``
  of the ``.npy`` ``Array``); Flower 1.42 no longer sends records that way;
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

    return Method("Flower ArrayRecord protobuf, .npy (legacy serde; before)", encode, decode)


def _reply(array: object) -> object:
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    return RecordDict({"update": ArrayRecord({"update": array}),
                       "result": ConfigRecord({"status": "ok", "num_examples": 1, "metrics": "{}"})})


def _decoder(numel: int, row: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """fedtrain's checked decode of a training reply into ``row`` (the sink's copy)."""
    from fedtrain.transport.flower import parse_train_reply

    def decode(content: object) -> torch.Tensor:
        vector, _, _ = parse_train_reply(content, numel)  # type: ignore[arg-type]
        np.copyto(row.numpy(), vector)
        return row

    return decode


def _fedtrain(numel: int) -> Method:
    from fedtrain.transport.flower import float32_array

    row = torch.empty(numel)
    decode = _decoder(numel, row)
    store: dict[str, object] = {}

    def encode(t: torch.Tensor) -> bytes:
        store["content"] = _reply(float32_array(t.numpy()))
        return store["content"]["update"]["update"].data  # type: ignore[index]

    return Method("fedtrain wire encoding: raw Array, checked (after)", encode, lambda b: decode(store["content"]))


def _objects(numel: int, raw: bool) -> Method:
    """Flower's deployment path: the reply deflated into objects and inflated back."""
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedtrain.transport.flower import float32_array

    row = torch.empty(numel)
    decode_raw = _decoder(numel, row)
    store: dict[str, object] = {}

    def encode(t: torch.Tensor) -> bytes:
        array = float32_array(t.numpy()) if raw else Array(np.ascontiguousarray(t.numpy(), dtype=np.float32))
        content = _reply(array)
        objects = get_all_nested_objects(content)  # type: ignore[arg-type]
        store["root"] = content.object_id  # type: ignore[attr-defined]
        store["contents"] = {object_id: obj.deflate() for object_id, obj in objects.items()}
        return b"".join(store["contents"].values())  # type: ignore[attr-defined]

    def decode(_: bytes) -> torch.Tensor:
        content = inflate_object_from_contents(store["root"], dict(store["contents"]))  # type: ignore[arg-type]
        if raw:
            return decode_raw(content)
        return torch.from_numpy(content["update"]["update"].numpy())  # type: ignore[index]

    name = "raw Array (after)" if raw else ".npy Array (before)"
    return Method(f"Flower 1.42 deployment path: objects, {name}", encode, decode)


def _sha256() -> Method:
    import hashlib

    return Method("SHA-256 of the bytes (Flower's object ids: the floor of its path)",
                  lambda t: hashlib.sha256(t.numpy().data).digest(), lambda b: torch.empty(0))


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
    rows: list[list[object]] = []
    for numel in sizes:
        methods = [_raw(), _fedtrain(numel), _objects(numel, True), _objects(numel, False), _sha256(), _flower(),
                   _torch_save(), _pickle()]
        vector = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        nbytes = vector.numel() * vector.element_size()
        target = torch.empty_like(vector)
        t_copy = best_seconds(lambda: target.copy_(vector), repeats)
        t_raw = 0.0
        for method in methods:
            blob = method.encode(vector)
            back = method.decode(blob)
            if method.name.startswith("SHA-256"):
                blob = vector.numpy().tobytes()
            elif not torch.equal(back, vector):
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
         "raw decode (numpy.frombuffer + torch.from_numpy) copies nothing: it is a view of the bytes",
         "fedtrain's decode copies the checked bytes once, into a preallocated row (the coordinator's sink)",
         "Flower's deployment path, bytes / raw bytes: every object's deflated content (headers included)",
         "SHA-256 row: encode hashes the bytes once, decode is empty; Flower hashes every object it pushes"],
    )


if __name__ == "__main__":
    main()
