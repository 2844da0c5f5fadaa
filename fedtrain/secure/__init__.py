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
* :mod:`~fedtrain.secure.setting` — config checks and per-round parameters.

The simulation runs both sides in process (:mod:`fedtrain.backends.secure`);
a deployment carries the same messages between processes.
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
