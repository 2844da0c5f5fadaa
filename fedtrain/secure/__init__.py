"""Secure aggregation: the coordinator learns only the sum of the clients' updates.

SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") on the logarithmic-degree neighbourhood
graph of SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"), for a semi-honest coordinator. Pure functions,
one module per thing they define, and one state machine per side:

* :mod:`~fedtrain.secure.quantize` — the ring ``Z_{2^bits}`` and fixed-point
  quantisation into it, with an overflow-free scale;
* :mod:`~fedtrain.secure.shamir` — Shamir secret sharing over GF(2^521 − 1)
  (hand-written; ``cryptography`` has none);
* :mod:`~fedtrain.secure.keys` — X25519 key agreement, HKDF, AES-GCM (``cryptography``);
* :mod:`~fedtrain.secure.masking` — masks as AES-CTR keystreams (``cryptography``);
* :mod:`~fedtrain.secure.graph` — the neighbourhood graph, degree and threshold;
* :mod:`~fedtrain.secure.messages` — the serialisable messages of each stage;
* :mod:`~fedtrain.secure.protocol` — :class:`SecureClient` and :class:`SecureServer`;
* :mod:`~fedtrain.secure.setting` — config checks and per-round parameters;
* :mod:`~fedtrain.secure.round` — one round driven over any transport's
  :class:`~fedtrain.secure.round.SecureChannel`: set-up, the four stages,
  aborts, the failures reported and the one update the engine sees.

The simulation runs both sides in process (:mod:`fedtrain.transport.in_process`);
a deployment carries the same messages between processes
(:mod:`fedtrain.transport.flower`). This package imports neither of them,
nor the training code, the engine or Flower.
"""

from fedtrain.secure.messages import AggregateSum, SecureSetup
from fedtrain.secure.protocol import ProtocolError, SecureAggregationAborted, SecureClient, SecureServer

__all__ = [
    "AggregateSum",
    "ProtocolError",
    "SecureAggregationAborted",
    "SecureClient",
    "SecureServer",
    "SecureSetup",
]
