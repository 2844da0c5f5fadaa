"""SecAgg+ as two state machines: :class:`SecureClient` and :class:`SecureServer`.

The protocol is Bonawitz et al. 2017 ("Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS) on the sparse neighbourhood graph
of Bell et al. 2020 (SecAgg+, CCS), for a semi-honest (honest-but-curious)
coordinator: it follows the protocol but tries to learn more than the sum.

Client ``u``'s masked input is

    y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u), v shared keys} ± PRG(s_uv)   (mod 2^bits)

with ``x_u`` its quantised contribution and weight, ``b_u`` a fresh
self-mask seed, ``s_uv`` the HKDF of the X25519 agreement of ``u``'s and
``v``'s mask keys, ``+`` when ``u < v`` and ``−`` otherwise, so pairwise
masks cancel in the sum. Each client Shamir-shares ``b_u`` and its mask
private key among its neighbours (threshold ``t``). After the masked inputs
arrive, the coordinator asks every survivor for shares of its surviving
neighbours' seeds (to remove their self-masks) and of its dropped neighbours'
mask keys (to remove the pairwise masks the survivors added for them). A
client never reveals both for the same neighbour, which is what keeps a late
straggler's input hidden: its self-mask stays.

Every method consumes the messages of one stage and returns the next ones;
calling out of order raises :class:`ProtocolError`. Malformed or missing
client messages exclude that client (a dropout), with the reason kept in
``SecureServer.excluded``; when too few shares remain to unmask, the round
aborts with :class:`SecureAggregationAborted` and nothing is revealed — the
abort happens before any unmask request when it is foreseeable.

Threat model. The coordinator is assumed semi-honest. The consistency-check
round of the malicious-server variant (Bonawitz et al. 2017, Fig. 4, round
"ConsistencyCheck", kept in Bell et al. 2020's malicious variant of SecAgg+:
every survivor signs the survivor set it was told of and checks the others'
signatures before unmasking) is **not** implemented, and neither are the
signed key adverts it relies on. What each client checks, so that a
deviating coordinator that does not control clients is bounded:

* the threshold is a strict majority of the ``k`` neighbours it was given
  (``k/2 < t ≤ k``), and it answers one unmask request per round, revealing
  for each neighbour either the self-mask-seed share or the mask-key share,
  never both. Any ``t`` holders of one secret of a client and any ``t``
  holders of the other overlap in at least one neighbour (``2t > k``), so
  however the coordinator splits its requests it cannot reconstruct both a
  survivor's seed and its mask key from honest neighbours alone;
* its neighbours' public keys are distinct from each other's and from its
  own: a coordinator replaying one client's advert under two identities, or
  this client's own key back to it, is refused before any share leaves;
* it masks with at least ``t`` peers, and unmasks only when the request
  names at least ``t`` survivors (as Flower's ``secaggplus_mod`` does), only
  its own mask peers, and no client as both survivor and dropped.

What is not bounded: with ``c`` neighbours of a client colluding with the
coordinator — or played by it, since nothing authenticates an advert end to
end — the coordinator reconstructs both secrets once ``2t ≤ k + c``, by
telling some neighbours the client survived and others that it dropped. The
consistency check and signed adverts are what close that gap (security then
holds while ``c < t``); until they exist, treat the coordinator as trusted
to follow the protocol, and TLS client authentication as what keeps
impostors out of the cohort.

Malicious clients. No range proof accompanies a masked input, so a client
can add any ring element to any slot of the sum. The coordinator bounds the
damage after unmasking (:func:`sum_rejection_reason`): the summed weight must
lie in ``[m, m · max_weight]`` for ``m`` survivors (each weight is at least
1 and at most ``max_weight``), and each coordinate of the sum in
``±clip_range · W / max_weight`` for the summed weight ``W``, which every
honest sum satisfies because honest clients clamp each coordinate to
``±clip_range`` before weighting. A round that fails either aborts. What a
malicious client can still do is the semi-honest model's residue: shift the
released mean anywhere within ``±clip_range`` per coordinate (by its own
contribution, and by moving the weight slot within its range); bounding it
more tightly needs zero-knowledge range proofs on each contribution
(e.g. Bell et al. 2023, "ACORN: Input Validation for Secure Aggregation";
Lycklama et al. 2023, "RoFL: Robustness of Secure Federated Learning") or robust
aggregation, which a sum alone does not allow.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from typing import Sequence

import numpy as np
import torch

from fedtrain.privacy.noise import NoiseSource
from fedtrain.secure import keys
from fedtrain.secure.graph import NeighbourGraph
from fedtrain.secure.keys import KeyPair, Purpose
from fedtrain.secure.masking import add_mask_
from fedtrain.secure.messages import (
    AggregateSum,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    Neighbourhood,
    OwnedShare,
    SecureSetup,
    ShareDelivery,
    SharedKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedtrain.secure.quantize import FLOAT_ROUNDING
from fedtrain.secure.shamir import SECRET_BYTES, SHARE_BYTES, Share, reconstruct, split

COMMITMENT_BYTES = 32


class ProtocolError(RuntimeError):
    """A message that does not fit the protocol (wrong stage, recipient, shape)."""


class SecureAggregationAborted(RuntimeError):
    """The round produced no sum: too few clients remain to unmask it (nothing
    was revealed), or the unmasked sum is one no honest cohort could produce
    (it is discarded)."""


class ClientStage(enum.Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


class ServerStage(enum.Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


def commitment(session: bytes, seed: bytes) -> bytes:
    """SHA-256 of the session and a self-mask seed: binds the seed without revealing it."""
    return hashlib.sha256(session + seed).digest()


def _associated(session: bytes, sender: int, recipient: int) -> bytes:
    return session + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def sum_rejection_reason(total: np.ndarray, weight: int, contributors: int, setup: SecureSetup) -> str | None:
    """Why an unmasked sum cannot be released, or None when it can.

    ``contributors`` honest clients send weights in ``1 … max_weight``, so
    their summed ``weight`` lies in ``[contributors, contributors ·
    max_weight]``; each clamps its update to ``±clip_range`` and scales it by
    ``weight_i / max_weight``, so each coordinate of ``total`` lies within
    ``clip_range · weight / max_weight`` plus the quantisation error of the
    sum. Outside either range some client wrote into the ring what no honest
    client can: a summed weight of 0 would divide by zero, a weight of 1
    among thousands of records would amplify the mean a thousandfold.
    """
    if contributors < 1:
        return f"contributors = {contributors}: a sum needs at least one"
    low, high = contributors, contributors * setup.max_weight
    if isinstance(weight, bool) or not isinstance(weight, int) or not low <= weight <= high:
        return (
            f"summed weight = {weight!r}: {contributors} survivors with weights in 1 … {setup.max_weight} "
            f"allow {low} … {high}"
        )
    limit = setup.clip_range * weight / setup.max_weight * (1.0 + FLOAT_ROUNDING)
    limit += setup.quantizer.sum_error_bound(contributors)
    values = np.asarray(total, dtype=np.float64)
    if values.shape != (setup.vector_length,):
        return f"sum of shape {values.shape}, expected ({setup.vector_length},)"
    peak = float(np.abs(values).max(initial=0.0))
    if not peak <= limit:
        return (
            f"sum coordinate of magnitude {peak:.6g}: {contributors} survivors clamped to "
            f"±clip_range = {setup.clip_range} with summed weight {weight} allow at most {limit:.6g}"
        )
    return None


def _share_plaintext(sender: int, recipient: int, seed_share: Share, key_share: Share) -> bytes:
    return (
        sender.to_bytes(4, "big")
        + recipient.to_bytes(4, "big")
        + seed_share.y.to_bytes(SHARE_BYTES, "big")
        + key_share.y.to_bytes(SHARE_BYTES, "big")
    )


class SecureClient:
    """One client's side of a round: ``advertise`` → ``share_keys`` →
    ``masked_input`` → ``unmask``.

    All key material comes from the OS CSPRNG (``cryptography``'s key
    generation, :mod:`secrets`); ``noise`` (distributed DP) should be a
    :class:`fedtrain.privacy.noise.SecureGaussian`.
    """

    def __init__(self, index: int, setup: SecureSetup, noise: NoiseSource | None = None) -> None:
        if not 0 <= index < setup.num_clients:
            raise ValueError(f"index = {index}: must be in 0 … {setup.num_clients - 1}")
        if setup.noise_stddev > 0 and noise is None:
            raise ValueError(f"noise_stddev = {setup.noise_stddev}: needs a noise source")
        self.index = index
        self.setup = setup
        self.stage = ClientStage.ADVERTISE_KEYS
        self._noise = noise
        self._mask_keys: KeyPair | None = None
        self._share_keys: KeyPair | None = None
        self._seed = b""
        self._peers: dict[int, KeyAdvert] = {}
        self._pair_keys: dict[int, bytes] = {}
        self._received: dict[int, tuple[Share, Share]] = {}

    def _expect(self, stage: ClientStage) -> None:
        if self.stage is not stage:
            raise ProtocolError(f"client {self.index}: got a {stage.value} message in stage {self.stage.value}")

    def _expect_recipient(self, recipient: int) -> None:
        if recipient != self.index:
            raise ProtocolError(f"client {self.index}: message addressed to client {recipient}")

    def advertise(self) -> KeyAdvert:
        self._expect(ClientStage.ADVERTISE_KEYS)
        self._mask_keys, self._share_keys = KeyPair.generate(), KeyPair.generate()
        self.stage = ClientStage.SHARE_KEYS
        return KeyAdvert(self.index, self._mask_keys.public, self._share_keys.public)

    def share_keys(self, neighbourhood: Neighbourhood) -> SharedKeys:
        """Shamir-share a fresh self-mask seed and the mask private key among
        the neighbours, each pair of shares sealed for its recipient."""
        self._expect(ClientStage.SHARE_KEYS)
        self._expect_recipient(neighbourhood.recipient)
        if self._mask_keys is None or self._share_keys is None:
            raise ProtocolError(f"client {self.index}: no keys advertised")
        peers = {p.sender: p for p in neighbourhood.peers}
        if len(peers) != len(neighbourhood.peers) or self.index in peers:
            raise ProtocolError(f"client {self.index}: neighbourhood repeats a client or names this one")
        if any(not 0 <= v < self.setup.num_clients for v in peers):
            raise ProtocolError(f"client {self.index}: neighbourhood names clients outside the round")
        t = self.setup.threshold
        if len(peers) < t:
            raise ProtocolError(
                f"client {self.index}: {len(peers)} neighbours, fewer than the threshold {t}"
            )
        if 2 * t <= len(peers):
            raise ProtocolError(
                f"client {self.index}: threshold = {t} with {len(peers)} neighbours is not a strict majority; "
                f"allowed: threshold > {len(peers) // 2}, so that no two disjoint groups of neighbours can "
                "each reconstruct one of its secrets"
            )
        repeated = self._repeated_keys(peers)
        if repeated:
            raise ProtocolError(f"client {self.index}: neighbourhood repeats public keys ({repeated})")
        self._seed = secrets.token_bytes(SECRET_BYTES)
        order = sorted(peers)
        xs = [v + 1 for v in order]
        seed_shares = split(self._seed, xs, self.setup.threshold)
        key_shares = split(self._mask_keys.private, xs, self.setup.threshold)
        sealed: list[EncryptedShare] = []
        for v, seed_share, key_share in zip(order, seed_shares, key_shares):
            try:
                key = keys.agree(self._share_keys.key, peers[v].share_public, self.setup.session, Purpose.SHARES)
            except ValueError as exc:
                raise ProtocolError(f"client {self.index}: neighbour {v}'s share key: {exc}") from None
            self._pair_keys[v] = key
            nonce, ciphertext = keys.seal(
                key, _share_plaintext(self.index, v, seed_share, key_share),
                _associated(self.setup.session, self.index, v),
            )
            sealed.append(EncryptedShare(self.index, v, nonce, ciphertext))
        self._peers = peers
        self.stage = ClientStage.MASKED_INPUT
        return SharedKeys(self.index, commitment(self.setup.session, self._seed), tuple(sealed))

    def _repeated_keys(self, peers: dict[int, KeyAdvert]) -> str:
        """Who advertised a public key that someone else (or this client, or
        the same advert for its other purpose) also holds; empty when every
        key of the neighbourhood is distinct."""
        if self._mask_keys is None or self._share_keys is None:
            raise ProtocolError(f"client {self.index}: no keys advertised")
        owners: dict[bytes, list[str]] = {}
        owners.setdefault(self._mask_keys.public, []).append(f"client {self.index} (itself) mask key")
        owners.setdefault(self._share_keys.public, []).append(f"client {self.index} (itself) share key")
        for v in sorted(peers):
            owners.setdefault(peers[v].mask_public, []).append(f"client {v} mask key")
            owners.setdefault(peers[v].share_public, []).append(f"client {v} share key")
        return "; ".join(" = ".join(names) for names in owners.values() if len(names) > 1)

    def _open(self, share: EncryptedShare) -> tuple[Share, Share]:
        if share.recipient != self.index or share.sender not in self._pair_keys:
            raise ProtocolError(f"client {self.index}: share from {share.sender} to {share.recipient} is not for it")
        try:
            plain = keys.open_sealed(
                self._pair_keys[share.sender], share.nonce, share.ciphertext,
                _associated(self.setup.session, share.sender, self.index),
            )
        except ValueError as exc:
            raise ProtocolError(f"client {self.index}: share from {share.sender}: {exc}") from None
        expected = 8 + 2 * SHARE_BYTES
        if len(plain) != expected or plain[:8] != _associated(b"", share.sender, self.index):
            raise ProtocolError(f"client {self.index}: share from {share.sender} is malformed")
        x = self.index + 1
        try:
            return (
                Share(x, int.from_bytes(plain[8 : 8 + SHARE_BYTES], "big")),
                Share(x, int.from_bytes(plain[8 + SHARE_BYTES :], "big")),
            )
        except ValueError as exc:
            raise ProtocolError(f"client {self.index}: share from {share.sender}: {exc}") from None

    def masked_input(self, delivery: ShareDelivery, update: np.ndarray, weight: int) -> MaskedInput:
        """Mask ``(weight / max_weight) · clamp(update)`` (plus this client's
        noise share under distributed DP), quantised, followed by ``weight``.

        ``clamp`` limits each coordinate to ``±clip_range`` before weighting,
        and scaling by ``weight / max_weight`` keeps every contribution inside
        ``[−range, range]``, so the weighted sum cannot overflow however many
        records a client has, and an honest sum never exceeds ``clip_range ·
        Σ weight / max_weight`` per coordinate, which the coordinator checks
        (:func:`sum_rejection_reason`) before dividing by the summed weight.
        """
        self._expect(ClientStage.MASKED_INPUT)
        self._expect_recipient(delivery.recipient)
        setup = self.setup
        vector = np.asarray(update)
        if vector.shape != (setup.vector_length,):
            raise ValueError(f"update shape {vector.shape}: expected ({setup.vector_length},)")
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= setup.max_weight:
            raise ValueError(f"weight = {weight!r}: must be an integer in 1 … {setup.max_weight}")
        senders = [s.sender for s in delivery.shares]
        if len(set(senders)) != len(senders):
            raise ProtocolError(f"client {self.index}: delivery repeats a sender")
        if len(senders) < setup.threshold:
            raise ProtocolError(
                f"client {self.index}: {len(senders)} mask peers, fewer than the threshold {setup.threshold}: "
                "too few pairwise masks would leave the input to its self-mask alone"
            )
        self._received = {s.sender: self._open(s) for s in delivery.shares}
        contribution = vector.astype(np.float64)
        if not np.isfinite(contribution).all():
            raise ValueError("update has NaN or infinite values")
        np.clip(contribution, -setup.clip_range, setup.clip_range, out=contribution)
        contribution *= weight / setup.max_weight
        if setup.noise_stddev > 0 and self._noise is not None:
            noise = self._noise.gaussian(setup.vector_length, setup.noise_stddev, torch.device("cpu"))
            contribution += noise.numpy().astype(np.float64)
        ring = setup.ring
        masked = ring.zeros(setup.masked_length)
        masked[: setup.vector_length] = setup.quantizer.encode(contribution)
        masked[setup.vector_length] = weight
        add_mask_(masked, self._seed, ring, 1)
        if self._mask_keys is None:
            raise ProtocolError(f"client {self.index}: no mask key")
        for v in sorted(self._received):
            try:
                seed = keys.agree(self._mask_keys.key, self._peers[v].mask_public, setup.session, Purpose.MASK)
            except ValueError as exc:
                raise ProtocolError(f"client {self.index}: neighbour {v}'s mask key: {exc}") from None
            add_mask_(masked, seed, ring, 1 if self.index < v else -1)
        self.stage = ClientStage.UNMASK
        return MaskedInput(self.index, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of surviving and key shares of dropped mask peers,
        refusing a request that names a client in both lists or one this
        client did not mask with."""
        self._expect(ClientStage.UNMASK)
        self._expect_recipient(request.recipient)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) < self.setup.threshold:
            raise ProtocolError(
                f"client {self.index}: unmask request names {len(survivors)} surviving neighbours, fewer than "
                f"the threshold {self.setup.threshold}; refusing to reveal shares for a round that cannot "
                "recover this client's own self-mask"
            )
        if survivors & dropped:
            raise ProtocolError(
                f"client {self.index}: clients {sorted(survivors & dropped)} named as both survivor and dropped"
            )
        unknown = (survivors | dropped) - set(self._received)
        if unknown:
            raise ProtocolError(f"client {self.index}: clients {sorted(unknown)} are not its mask peers")
        self.stage = ClientStage.DONE
        return UnmaskResponse(
            self.index,
            tuple(OwnedShare(u, self._received[u][0]) for u in sorted(survivors)),
            tuple(OwnedShare(u, self._received[u][1]) for u in sorted(dropped)),
        )


class SecureServer:
    """The coordinator's side of a round: ``collect_adverts`` →
    ``collect_shares`` → ``collect_masked`` → ``collect_unmask``.

    It only routes sealed shares and sums masked vectors; what it learns is
    the :class:`AggregateSum` of the clients whose masked inputs arrived.
    """

    def __init__(self, setup: SecureSetup, graph: NeighbourGraph) -> None:
        if graph.size != setup.num_clients:
            raise ValueError(f"graph of {graph.size} clients: the setup has num_clients = {setup.num_clients}")
        if graph.size > 1 and 2 * setup.threshold <= graph.max_degree:
            raise ValueError(
                f"threshold = {setup.threshold}: not a strict majority of a client's {graph.max_degree} "
                f"neighbours; allowed: threshold > {graph.max_degree // 2} (derive the setup from this graph)"
            )
        self.setup = setup
        self.graph = graph
        self.stage = ServerStage.ADVERTISE_KEYS
        self.excluded: dict[int, str] = {}
        self._adverts: dict[int, KeyAdvert] = {}
        self._peers: dict[int, tuple[int, ...]] = {}
        self._shared: dict[int, SharedKeys] = {}
        self._mask_peers: dict[int, frozenset[int]] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self._requests: dict[int, UnmaskRequest] = {}

    def _expect(self, stage: ServerStage) -> None:
        if self.stage is not stage:
            raise ProtocolError(f"coordinator: {stage.value} messages in stage {self.stage.value}")

    def _exclude(self, client: int, reason: str) -> None:
        self.excluded.setdefault(client, reason)

    def _abort(self, reason: str) -> SecureAggregationAborted:
        self.stage = ServerStage.ABORTED
        return SecureAggregationAborted(reason)

    def _valid_senders(self, senders: Sequence[int], allowed: set[int] | dict[int, object]) -> set[int]:
        """Senders that may speak at this stage, each once; others are excluded."""
        seen: set[int] = set()
        repeated: set[int] = set()
        for s in senders:
            if isinstance(s, bool) or not isinstance(s, int) or s not in allowed:
                continue
            (repeated if s in seen else seen).add(s)
        for s in repeated:
            self._exclude(s, "sent more than one message in one stage")
        return seen - repeated

    def _prune(self, alive: set[int], stage: str) -> set[int]:
        """Drop clients with fewer than ``t`` live neighbours (their secrets
        could never be recovered) until every remaining client has ``t``;
        returns the clients that remain."""
        alive = set(alive)
        t = self.setup.threshold
        changed = True
        while changed:
            changed = False
            for u in sorted(alive):
                live = sum(1 for v in self.graph.neighbours[u] if v in alive)
                if live < t:
                    alive.discard(u)
                    self._exclude(u, f"{stage}: only {live} neighbours left, threshold is {t}")
                    changed = True
        if not alive:
            raise self._abort(f"{stage}: no client has threshold t = {t} neighbours left")
        return alive

    def collect_adverts(self, adverts: Sequence[KeyAdvert]) -> dict[int, Neighbourhood]:
        self._expect(ServerStage.ADVERTISE_KEYS)
        candidates = {a.sender: a for a in adverts if isinstance(a, KeyAdvert)}
        valid = self._valid_senders([a.sender for a in adverts if isinstance(a, KeyAdvert)],
                                    set(range(self.setup.num_clients)))
        for u in sorted(valid):
            a = candidates[u]
            if not (isinstance(a.mask_public, bytes) and isinstance(a.share_public, bytes)
                    and len(a.mask_public) == keys.KEY_BYTES and len(a.share_public) == keys.KEY_BYTES):
                valid.discard(u)
                self._exclude(u, "advertised keys are not 32-byte X25519 public keys")
        for u in range(self.setup.num_clients):
            if u not in valid:
                self._exclude(u, "advertised no keys")
        alive = self._prune(valid, "advertise keys")
        self._adverts = {u: candidates[u] for u in alive}
        self._peers = {u: tuple(v for v in self.graph.neighbours[u] if v in alive) for u in alive}
        self.stage = ServerStage.SHARE_KEYS
        return {u: Neighbourhood(u, tuple(self._adverts[v] for v in self._peers[u])) for u in sorted(alive)}

    def collect_shares(self, messages: Sequence[SharedKeys]) -> dict[int, ShareDelivery]:
        self._expect(ServerStage.SHARE_KEYS)
        messages = [m for m in messages if isinstance(m, SharedKeys)]
        by_sender = {m.sender: m for m in messages}
        valid = self._valid_senders([m.sender for m in messages], self._adverts)
        for u in sorted(valid):
            m = by_sender[u]
            recipients = sorted(s.recipient for s in m.shares if isinstance(s, EncryptedShare))
            if (recipients != sorted(self._peers[u]) or len(recipients) != len(m.shares)
                    or any(s.sender != u for s in m.shares)
                    or not isinstance(m.seed_commitment, bytes) or len(m.seed_commitment) != COMMITMENT_BYTES):
                valid.discard(u)
                self._exclude(u, "shares do not match its neighbourhood")
        for u in self._adverts:
            if u not in valid:
                self._exclude(u, "shared no keys")
        alive = self._prune(valid, "share keys")
        self._shared = {u: by_sender[u] for u in alive}
        self._mask_peers = {u: frozenset(v for v in self._peers[u] if v in alive) for u in alive}
        deliveries: dict[int, list[EncryptedShare]] = {u: [] for u in alive}
        for u in sorted(alive):
            for s in self._shared[u].shares:
                if s.recipient in alive:
                    deliveries[s.recipient].append(s)
        self.stage = ServerStage.MASKED_INPUT
        return {v: ShareDelivery(v, tuple(shares)) for v, shares in sorted(deliveries.items())}

    def _reconstruction_shortfall(self, survivors: set[int], responders: set[int]) -> str | None:
        """Why some mask could not be removed with shares from ``responders``, or None."""
        t = self.setup.threshold
        dropped = set(self._shared) - survivors
        for u in sorted(self._shared):
            holders = self._mask_peers[u] & responders
            if u in survivors and len(holders) < t:
                return f"client {u}'s self-mask: {len(holders)} of its neighbours can reveal shares, threshold is {t}"
            if u in dropped and self._mask_peers[u] & survivors and len(holders) < t:
                return (
                    f"dropped client {u}'s pairwise masks: {len(holders)} of its neighbours can reveal shares, "
                    f"threshold is {t}"
                )
        return None

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Keep well-formed masked vectors; a wrongly sized or typed one excludes
        its sender, whose pairwise masks are then removed as for a dropout."""
        self._expect(ServerStage.MASKED_INPUT)
        inputs = [m for m in inputs if isinstance(m, MaskedInput)]
        by_sender = {m.sender: m for m in inputs}
        valid = self._valid_senders([m.sender for m in inputs], self._shared)
        ring = self.setup.ring
        for u in sorted(valid):
            reason = ring.rejection_reason(by_sender[u].vector, self.setup.masked_length)
            if reason is not None:
                valid.discard(u)
                self._exclude(u, reason)
        for u in self._shared:
            if u not in valid:
                self._exclude(u, "sent no masked input")
        if not valid:
            raise self._abort("masked input: no client sent a valid masked vector")
        shortfall = self._reconstruction_shortfall(valid, valid)
        if shortfall is not None:
            raise self._abort(f"masked input: too many dropouts to unmask ({shortfall}); nothing was revealed")
        self._inputs = {u: by_sender[u].vector for u in valid}
        self._requests = {
            v: UnmaskRequest(
                v,
                tuple(sorted(self._mask_peers[v] & valid)),
                tuple(sorted(self._mask_peers[v] - valid)),
            )
            for v in sorted(valid)
        }
        self.stage = ServerStage.UNMASK
        return dict(self._requests)

    def _response_ok(self, response: UnmaskResponse) -> bool:
        request = self._requests[response.sender]
        x = response.sender + 1
        for owned, wanted in ((response.seed_shares, request.survivors), (response.key_shares, request.dropped)):
            if not isinstance(owned, tuple) or tuple(o.owner for o in owned if isinstance(o, OwnedShare)) != wanted:
                return False
            if any(not isinstance(o.share, Share) or o.share.x != x for o in owned):
                return False
        return True

    def collect_unmask(self, responses: Sequence[UnmaskResponse]) -> AggregateSum:
        """Reconstruct the secrets, strip every mask, and return the sum.

        Raises :class:`SecureAggregationAborted` when fewer than ``t``
        neighbours of some client answered, or when a reconstructed secret
        does not match its commitment (a wrong share); no sum is returned then.
        """
        self._expect(ServerStage.UNMASK)
        responses = [r for r in responses if isinstance(r, UnmaskResponse)]
        by_sender = {r.sender: r for r in responses}
        valid = self._valid_senders([r.sender for r in responses], self._inputs)
        for v in sorted(valid):
            if not self._response_ok(by_sender[v]):
                valid.discard(v)
                self._exclude(v, "unmask response does not answer its request (its input is still summed)")
        survivors = set(self._inputs)
        shortfall = self._reconstruction_shortfall(survivors, valid)
        if shortfall is not None:
            raise self._abort(f"unmask: too few shares ({shortfall}); no sum is released")
        t = self.setup.threshold
        seed_shares: dict[int, list[Share]] = {}
        key_shares: dict[int, list[Share]] = {}
        for v in sorted(valid):
            for o in by_sender[v].seed_shares:
                seed_shares.setdefault(o.owner, []).append(o.share)
            for o in by_sender[v].key_shares:
                key_shares.setdefault(o.owner, []).append(o.share)
        ring = self.setup.ring
        total = ring.zeros(self.setup.masked_length)
        for u in sorted(survivors):
            np.add(total, self._inputs[u], out=total)
        ring.reduce_(total)
        session = self.setup.session
        for u in sorted(survivors):
            seed = self._recover(seed_shares.get(u, []), t, f"client {u}'s self-mask seed")
            if not secrets.compare_digest(commitment(session, seed), self._shared[u].seed_commitment):
                raise self._abort(f"unmask: client {u}'s reconstructed seed does not match its commitment")
            add_mask_(total, seed, ring, -1)
        for u in sorted(set(self._shared) - survivors):
            peers = sorted(self._mask_peers[u] & survivors)
            if not peers:
                continue
            private = keys.private_key(self._recover(key_shares.get(u, []), t, f"dropped client {u}'s mask key"))
            if keys.public_of(private) != self._adverts[u].mask_public:
                raise self._abort(f"unmask: dropped client {u}'s reconstructed key does not match its advert")
            for v in peers:
                seed = keys.agree(private, self._adverts[v].mask_public, session, Purpose.MASK)
                add_mask_(total, seed, ring, -1 if v < u else 1)
        weight = int(ring.to_signed(total[-1:])[0])
        decoded = self.setup.quantizer.decode(total[:-1])
        reason = sum_rejection_reason(decoded, weight, len(survivors), self.setup)
        if reason is not None:
            raise self._abort(f"unmask: the sum is not one honest clients can produce ({reason}); it is discarded")
        self.stage = ServerStage.DONE
        return AggregateSum(
            total=decoded,
            weight=weight,
            contributors=tuple(sorted(survivors)),
            excluded=tuple((c, why) for c, why in sorted(self.excluded.items()) if c not in survivors),
        )

    def _recover(self, shares: list[Share], t: int, what: str) -> bytes:
        try:
            return reconstruct(sorted(shares, key=lambda s: s.x), t)
        except ValueError as exc:
            raise self._abort(f"unmask: cannot reconstruct {what}: {exc}") from None

