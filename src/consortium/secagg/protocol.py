"""SecAgg+ as two I/O-free state machines: one per site, one for the coordinator.

The rounds are those of Bonawitz et al. (CCS 2017), on the sparse neighbour
graphs of Bell et al. (CCS 2020):

1. ``advertise_keys``: each site makes two X25519 key pairs (c: encrypt
   shares, s: agree pairwise masks) and signs the public keys with its
   Ed25519 identity key.
2. ``share_keys``: each site draws a self-mask seed b_u and Shamir-shares b_u
   and its s private key among its neighbours, each share pair sealed with
   AES-GCM under a key only that neighbour can derive (X25519 + HKDF). The
   coordinator routes ciphertexts it cannot read. The site keeps one more
   share of b_u for itself (as in Bonawitz et al., where every user holds a
   share of its own secrets), so a survivor's self mask is recovered with
   one neighbour fewer; never one of its s key, which it never reveals.
3. ``collect_masked``: each site sends y_u = x_u + PRG(b_u) + sum over
   neighbours v of +/-PRG(s_uv) in Z_{2^bits}; pairwise masks cancel in the sum.
4. ``consistency_check``: the coordinator signs the list of sites whose input
   arrived; each site checks the signature, signs the list itself for the
   coordinator and tags it for each surviving neighbour with an HMAC under
   a key derived from their share channel (the active-server variant of
   Bonawitz et al.).
5. ``unmask``: each site checks that at least ``threshold`` neighbours
   tagged the same list (its own signature counting as one where the
   session's ``self_ack`` says the threshold allows it), then reveals, per
   neighbour, the share of its self-mask seed if it is alive or of its mask
   key if it dropped, never both, and only once; and its own seed share.

Why a site's own seed share costs nothing: an honest site reveals it only
once it has accepted a survivor list naming itself, and then no honest
neighbour can have accepted a list without it (two conflicting lists would
each need ``threshold`` acknowledgements, which the plan's threshold rules
out), so its mask key stays out of reach whatever is known of its seed.

Why tags and not signatures in step 5: a site only needs to be convinced
itself that its neighbours saw the list it saw. The pair's key comes from
the X25519 agreement on keys each side checked against the other's
signature in ``share_keys``, so the coordinator cannot forge a tag, and the
statement names sender and recipient, so it cannot reflect one. Bonawitz
et al. verify an Ed25519 signature per neighbour there; with 52 neighbours
those checks were a fifth of the whole round's work (about 100 us each on
this project's machines, against a few us for an HMAC).

The coordinator then removes the self masks of the survivors and the
pairwise masks of the dropped sites and learns the sum, and nothing else.
Any failure to verify raises; a site refuses rather than guesses.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.crypto import aead, keys, prg, shamir
from consortium.errors import ProtocolError, RoundFailed
from consortium.secagg.messages import (
    ConsistencyAck,
    KeyAdvert,
    KeyRoster,
    MaskedInput,
    SessionParams,
    ShareBundle,
    ShareDelivery,
    SharePlaintext,
    SurvivorList,
    UnmaskReply,
    UnmaskRequest,
    ack_key_context,
    ack_statement,
    advert_statement,
    mask_context,
    share_context,
    share_key_context,
    survivors_statement,
)
from consortium.wire import B64, Frozen, Tensor


class SecAggError(ProtocolError):
    """A secure-aggregation message that a party refuses to act on."""


class SecAggAborted(RoundFailed):
    """Too few sites remain to finish the session: it aborts and reveals nothing."""


def _pairwise_seed(s_private, peer_s_pk: bytes, params: SessionParams, a: str, b: str) -> bytes:
    secret = keys.exchange(s_private, peer_s_pk)
    return prg.derive_seed(secret, info=mask_context(params.session_id, a, b))


def check_params(params: SessionParams, me: str) -> frozenset[str]:
    """A site's own check of the session the coordinator proposes; returns its neighbours."""
    if me not in params.positions:
        raise SecAggError(f"site '{me}' is not a participant of this session")
    n = len(params.participants)
    if params.graph == "complete" and params.degree != n - 1:
        raise SecAggError(f"a complete graph on {n} sites has degree {n - 1}, not {params.degree}")
    counted = params.degree + (1 if params.self_ack else 0)  # who may acknowledge a survivor list
    if not (counted // 2 < params.threshold <= params.degree):
        raise SecAggError(
            f"threshold {params.threshold} with {params.degree} neighbours{' and the site itself' if params.self_ack else ''} "
            "is unsafe: it must exceed half of those who acknowledge the survivor list, or a coordinator could collect "
            "both kinds of share for one site"
        )
    mine = params.neighbours_of(me)
    if len(mine) != params.degree:
        raise SecAggError(f"site '{me}' has {len(mine)} neighbours in the graph, not the declared {params.degree}")
    return mine


class SecAggClient:
    """One site's side of one session. Methods must be called in stage order, each once."""

    def __init__(
        self,
        name: str,
        identity: Ed25519PrivateKey,
        params: SessionParams,
        directory: Mapping[str, bytes],
        coordinator_key: bytes,
    ) -> None:
        self.name = name
        self.params = params
        self.neighbours = check_params(params, name)
        self._identity = identity
        self._directory = dict(directory)
        self._coordinator_key = coordinator_key
        self._stage = "advertise_keys"
        self._c_sk, _ = keys.generate_x25519()
        self._s_sk, _ = keys.generate_x25519()
        self._b = os.urandom(prg.SEED_BYTES)
        self._peers: dict[str, KeyAdvert] = {}
        self._held: dict[str, SharePlaintext] = {}  # neighbour -> the shares it gave us
        self._channels: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (AES-GCM key, HMAC key), both sides derive
        self._signed_survivors: tuple[str, ...] | None = None
        self._signed_sha256 = b""  # SHA-256 of the survivor statement this site signed: what its tags cover
        self._own_seed_share = b""

    def _advance(self, expected: str, nxt: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"site '{self.name}' is at stage {self._stage}, not {expected}: request refused")
        self._stage = nxt

    def _channel(self, v: str) -> tuple[bytes, bytes]:
        """The keys this site shares with neighbour ``v`` alone: (share encryption, acknowledgement tags)."""
        if v not in self._channels:
            sid = self.params.session_id  # the contexts are the same from either side
            infos = (share_key_context(sid, self.name, v), ack_key_context(sid, self.name, v))
            self._channels[v] = aead.derive_keys(self._c_sk, self._peers[v].c_pk, infos=infos)
        return self._channels[v]

    def advertise_keys(self) -> KeyAdvert:
        self._advance("advertise_keys", "share_keys")
        c_pk = keys.x25519_public_bytes(self._c_sk.public_key())
        s_pk = keys.x25519_public_bytes(self._s_sk.public_key())
        sig = keys.sign(self._identity, advert_statement(self.params.session_id, self.name, c_pk, s_pk))
        return KeyAdvert(site=self.name, c_pk=c_pk, s_pk=s_pk, signature=sig)

    def share_keys(self, roster: KeyRoster) -> ShareBundle:
        self._advance("share_keys", "collect_masked")
        p = self.params
        for adv in roster.adverts:
            if adv.site not in self.neighbours:
                raise SecAggError(f"the roster lists '{adv.site}', which is not a neighbour of '{self.name}'")
            if adv.site in self._peers:
                raise SecAggError(f"the roster lists '{adv.site}' twice")
            verify_advert(adv, p.session_id, self._directory)
            self._peers[adv.site] = adv
        if len(self._peers) < p.threshold:
            raise SecAggAborted(
                f"only {len(self._peers)} of '{self.name}''s neighbours advertised keys, fewer than the threshold "
                f"{p.threshold}: the session cannot protect its input and aborts"
            )
        holders = sorted(self._peers)
        xs = [p.x_of(v) for v in holders]
        seed_shares = shamir.split(self._b, threshold=p.threshold, xs=[*xs, p.x_of(self.name)])
        self._own_seed_share = seed_shares[p.x_of(self.name)]  # revealed by this site only, and only as a survivor
        key_shares = shamir.split(keys.x25519_private_bytes(self._s_sk), threshold=p.threshold, xs=xs)
        out = {}
        for v, x in zip(holders, xs):
            plain = SharePlaintext(sender=self.name, recipient=v, seed_share=seed_shares[x], key_share=key_shares[x])
            key, _ = self._channel(v)
            out[v] = aead.seal(key, plain.to_bytes(), associated_data=share_context(p.session_id, self.name, v))
        return ShareBundle(shares=out)

    def collect_masked(self, delivery: ShareDelivery, value: np.ndarray) -> MaskedInput:
        """Open the shares addressed to this site, then mask ``value`` (uint64 ring elements)."""
        self._advance("collect_masked", "consistency_check")
        p = self.params
        value = np.asarray(value)
        if value.dtype not in (np.uint32, np.uint64) or value.shape != (p.length,):
            raise SecAggError(f"the input must be {p.length} unsigned ring elements, got {value.dtype} {value.shape}")
        # The range check reads the whole input; it is skipped only where the dtype cannot exceed the ring.
        if value.size and np.iinfo(value.dtype).max >= 1 << p.bits and int(value.max()) >= 1 << p.bits:
            raise SecAggError(f"the input has values outside the 2^{p.bits} ring")
        for v, ciphertext in delivery.shares.items():
            if v not in self._peers:
                raise SecAggError(f"a share from '{v}', which advertised no keys to '{self.name}', is not one it expects")
            key, _ = self._channel(v)
            opened = aead.open_(key, ciphertext, associated_data=share_context(p.session_id, v, self.name))
            try:
                plain = SharePlaintext.from_bytes(opened)
            except ValueError as exc:  # authentic (the key is shared with v alone) but not a share plaintext
                raise SecAggError(f"the share ciphertext from '{v}' does not hold a share: {exc}") from None
            if plain.sender != v or plain.recipient != self.name:
                raise SecAggError(f"share ciphertext from '{v}' names {plain.sender} -> {plain.recipient}")
            self._held[v] = plain
        seeds, subtract = [self._b], [False]  # the self mask, then pairwise masks with every neighbour
        for v in self._held:  # that shared with us: + if we sort first
            seeds.append(_pairwise_seed(self._s_sk, self._peers[v].s_pk, p, self.name, v))
            subtract.append(self.name > v)
        # y = value + all masks mod 2^bits, in one cache-blocked pass, streamed straight into the bytes the
        # message carries: no intermediate vector (value is not modified)
        blocks = prg.iter_mask_sum(p.length, seeds, bits=p.bits, subtract=subtract, inputs=[value], reduce=True)
        raw = b"".join([block.astype("<" + block.dtype.str[1:], copy=False).tobytes() for block in blocks])
        ring = prg.ring_dtype(p.bits)
        y = np.frombuffer(raw, dtype=ring.newbyteorder("<")).astype(ring, copy=False)  # no copy on little-endian hosts
        return MaskedInput(vector=Tensor.from_numpy(y))  # shares raw: a view of a whole bytes object is not copied

    def consistency_check(self, survivors: SurvivorList) -> ConsistencyAck:
        self._advance("consistency_check", "unmask")
        p = self.params
        listed = survivors_statement(p.session_id, survivors.survivors)  # built once: checked, then signed
        keys.verify(self._coordinator_key, survivors.signature, listed)
        self._check_survivors(survivors.survivors)
        self._signed_survivors = tuple(sorted(survivors.survivors))
        digest = self._signed_sha256 = hashlib.sha256(listed).digest()
        surviving = frozenset(survivors.survivors)
        tags = {
            v: aead.mac(self._channel(v)[1], ack_statement(p.session_id, self.name, v, digest))
            for v in sorted(self._peers)
            if v in surviving
        }
        return ConsistencyAck(signature=keys.sign(self._identity, listed), tags=tags)

    def _check_survivors(self, survivors: tuple[str, ...]) -> None:
        unknown = [s for s in survivors if s not in self.params.positions]
        if unknown:
            raise SecAggError(f"the survivor list names '{unknown[0]}', which is not a participant: refused")
        if len(set(survivors)) != len(survivors):
            raise SecAggError("the survivor list names a site twice: refused")
        if self.name not in survivors:
            raise SecAggError(f"the survivor list leaves out '{self.name}', whose input was sent: refused")
        if len(survivors) < self.params.threshold:
            raise SecAggError(
                f"only {len(survivors)} survivors, fewer than the threshold {self.params.threshold}: "
                "unmasking so few inputs could expose one; refused"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        self._advance("unmask", "done")
        p = self.params
        alive, dead = set(request.survivors), set(request.dropped)
        both = sorted(alive & dead)
        if both:
            raise SecAggError(f"the unmask request lists '{both[0]}' as both alive and dropped: refused")
        unknown = sorted(s for s in alive | dead | set(request.acks) if s not in p.positions)
        if unknown:
            raise SecAggError(f"the unmask request names '{unknown[0]}', which is not a participant: refused")
        if tuple(sorted(alive)) != self._signed_survivors:
            raise SecAggError("the unmask request's survivors differ from the list this site signed: refused")
        digest = self._signed_sha256  # the list is the one signed (checked above): its statement is not built again
        for site, tag in request.acks.items():
            if site not in alive:
                raise SecAggError(f"an acknowledgement comes from '{site}', which is not a survivor: refused")
            if site not in self._peers:
                raise SecAggError(f"an acknowledgement comes from '{site}', which is not a neighbour of '{self.name}': refused")
            aead.check_mac(self._channel(site)[1], tag, ack_statement(p.session_id, site, self.name, digest))
        own = 1 if p.self_ack else 0  # this site signed the list too
        if len(request.acks) + own < p.threshold:  # every tag was checked: a bad one refuses the request, never skipped
            raise SecAggError(
                f"only {len(request.acks)} neighbours{' and this site' if own else ''} acknowledged the survivor list, "
                f"fewer than the threshold {p.threshold}: refused"
            )
        seed_shares, key_shares = {self.name: self._own_seed_share}, {}
        for v, plain in self._held.items():
            if v in alive:
                seed_shares[v] = plain.seed_share
            elif v in dead:
                key_shares[v] = plain.key_share
        return UnmaskReply(seed_shares=seed_shares, key_shares=key_shares)


def verify_advert(adv: KeyAdvert, session_id: str, directory: Mapping[str, bytes]) -> None:
    if adv.site not in directory:
        raise SecAggError(f"'{adv.site}' has no identity key in the consortium directory")
    if len(adv.c_pk) != keys.KEY_BYTES or len(adv.s_pk) != keys.KEY_BYTES:
        raise SecAggError(f"'{adv.site}' advertised malformed public keys")
    if adv.c_pk == adv.s_pk:
        raise SecAggError(f"'{adv.site}' advertised the same key twice: its two key pairs must differ")
    keys.verify(directory[adv.site], adv.signature, advert_statement(session_id, adv.site, adv.c_pk, adv.s_pk))


@dataclass(frozen=True)
class SecAggOutcome:
    total: np.ndarray  # uint64, the sum over ``included`` modulo 2^bits
    included: tuple[str, ...]  # sites whose input is in the sum
    dropped: tuple[str, ...]  # sites that shared keys but whose input never arrived


class SecAggServer:
    """The coordinator's side of one session. Each ``close_*`` ends a stage with what has arrived."""

    def __init__(
        self,
        params: SessionParams,
        signing_key: Ed25519PrivateKey,
        directory: Mapping[str, bytes],
        *,
        keep: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        """``keep``: where each masked input goes as it arrives (a file, for the evidence archive); the
        server then holds only their running sum, one vector whatever the number of sites. Without it the
        server keeps every input, for ``masked_inputs``."""
        self.params = params
        self.graph = params.neighbours()
        self._key = signing_key
        self._directory = dict(directory)
        self._stage = "advertise_keys"
        self._adverts: dict[str, KeyAdvert] = {}
        self._bundles: dict[str, dict[str, bytes]] = {}  # sender -> {recipient: ciphertext}, until delivered
        self._shared_with: dict[str, tuple[str, ...]] = {}  # sender -> the neighbours it sent shares to
        self._keep = keep
        self._arrived: dict[str, None] = {}  # whose masked input arrived
        self._masked_total = np.zeros(params.length, dtype=np.uint64)  # their sum, wrapping at 2^64 (the ring divides it)
        self._masked: dict[str, np.ndarray] = {}  # the inputs themselves, when no ``keep`` takes them
        self._survivors: tuple[str, ...] = ()
        self._surviving: frozenset[str] = frozenset()
        self._listed = b""
        self._acks: dict[str, ConsistencyAck] = {}
        self._replies: dict[str, UnmaskReply] = {}

    # -- helpers ---------------------------------------------------------------

    def _expect(self, stage: str, site: str, box: Mapping[str, object], among: Collection[str]) -> None:
        if self._stage != stage:
            raise SecAggError(f"'{site}' answered stage {stage} while the session is at {self._stage}")
        if site not in among:
            raise SecAggError(f"'{site}' is not expected at stage {stage}")
        if site in box:
            raise SecAggError(f"'{site}' answered stage {stage} twice")

    def _need(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggAborted(
                f"only {count} sites {what}, fewer than the threshold {self.params.threshold}: "
                "the session aborts and reveals nothing"
            )

    # -- stages ----------------------------------------------------------------

    def add_advert(self, site: str, adv: KeyAdvert) -> None:
        self._expect("advertise_keys", site, self._adverts, self.params.positions)
        if adv.site != site:
            raise SecAggError(f"'{site}' sent an advert for '{adv.site}'")
        verify_advert(adv, self.params.session_id, self._directory)
        self._adverts[site] = adv

    def close_advertise(self) -> dict[str, KeyRoster]:
        self._need(len(self._adverts), "advertised keys")
        self._stage = "share_keys"
        return {
            u: KeyRoster(adverts=tuple(self._adverts[v] for v in sorted(self.graph[u]) if v in self._adverts))
            for u in self._adverts
        }

    def add_shares(self, site: str, bundle: ShareBundle) -> None:
        self._expect("share_keys", site, self._shared_with, self._adverts)
        if not bundle.shares.keys() <= self.graph[site]:
            raise SecAggError(f"'{site}' sent shares to sites that are not its neighbours")
        self._bundles[site] = bundle.shares
        self._shared_with[site] = tuple(sorted(bundle.shares))

    def close_share_keys(self) -> dict[str, ShareDelivery]:
        self._need(len(self._bundles), "shared their keys")
        self._stage = "collect_masked"
        inbox: dict[str, dict[str, bytes]] = {u: {} for u in self._bundles}
        for v, shares in self._bundles.items():
            for u, ciphertext in shares.items():
                if u in inbox:
                    inbox[u][v] = ciphertext
        self._bundles = {}  # the ciphertexts live on in the deliveries alone
        return {u: ShareDelivery(shares=shares) for u, shares in inbox.items()}

    def add_masked(self, site: str, masked: MaskedInput) -> None:
        self._expect("collect_masked", site, self._arrived, self._shared_with)
        if masked.vector.shape != (self.params.length,) or masked.vector.dtype != prg.ring_dtype(self.params.bits).name:
            raise SecAggError(
                f"'{site}' sent {masked.vector.shape} {masked.vector.dtype} words, "
                f"not ({self.params.length},) {prg.ring_dtype(self.params.bits).name}"
            )
        # A read-only view of the tensor's bytes, not a copy: kept or handed on, then added to the sum.
        vector = np.frombuffer(masked.vector.raw, dtype=np.dtype(masked.vector.dtype).newbyteorder("<"))
        if self._keep is None:
            self._masked[site] = vector
        else:
            self._keep(site, vector)  # first: an input the archive could not take is not in the sum either
        np.add(self._masked_total, vector, out=self._masked_total)
        self._arrived[site] = None

    def close_collect_masked(self) -> SurvivorList:
        self._need(len(self._arrived), "sent a masked input")
        self._stage = "consistency_check"
        self._survivors = tuple(sorted(self._arrived))
        self._surviving = frozenset(self._survivors)
        self._listed = survivors_statement(self.params.session_id, self._survivors)  # what every acknowledgement signs
        return SurvivorList(survivors=self._survivors, signature=keys.sign(self._key, self._listed))

    def add_ack(self, site: str, ack: ConsistencyAck) -> None:
        self._expect("consistency_check", site, self._acks, self._surviving)
        keys.verify(self._directory[site], ack.signature, self._listed)
        if not set(ack.tags) <= self.graph[site] & self._surviving:
            raise SecAggError(f"'{site}' tagged its acknowledgement for sites that are not its surviving neighbours")
        self._acks[site] = ack

    def close_consistency(self) -> dict[str, UnmaskRequest]:
        self._need(len(self._acks), "acknowledged the survivor list")
        self._stage = "unmask"
        dropped = tuple(sorted(set(self._shared_with) - self._surviving))
        tags: dict[str, dict[str, bytes]] = {u: {} for u in self._acks}  # to each site, the tags addressed to it
        for v, ack in self._acks.items():
            for u, tag in ack.tags.items():
                if u in tags:
                    tags[u][v] = tag
        return {u: UnmaskRequest(survivors=self._survivors, dropped=dropped, acks=tags[u]) for u in self._acks}

    def add_unmask(self, site: str, reply: UnmaskReply) -> None:
        self._expect("unmask", site, self._replies, self._acks)
        self._replies[site] = reply

    def finish(self) -> SecAggOutcome:
        """Remove the masks and return the sum, or abort if too few shares arrived."""
        if self._stage != "unmask":
            raise SecAggError(f"cannot finish at stage {self._stage}")
        self._stage = "done"
        self._need(len(self._replies), "answered the unmask request")
        evidence = self.evidence()
        total = unmask_total(evidence, self._masked_total)
        return SecAggOutcome(total=total, included=self._survivors, dropped=evidence.dropped)

    def masked_inputs(self) -> dict[str, np.ndarray]:
        """The survivors' masked inputs, as received (each alone reveals nothing); ``SecAggError`` when a
        ``keep`` took them instead."""
        if self._keep is not None:
            raise SecAggError("this server handed each masked input to its keep and holds only their sum")
        return {u: self._masked[u] for u in self._survivors}

    def evidence(self) -> SessionEvidence:
        """What unmasking used, besides the masked inputs: enough for anyone to recompute the sum."""
        dropped = tuple(sorted(set(self._shared_with) - set(self._survivors)))
        return SessionEvidence(
            params=self.params,
            survivors=tuple(self._survivors),
            dropped=dropped,
            s_pks={u: a.s_pk for u, a in self._adverts.items()},
            replies=dict(self._replies),
            shared_with={v: self._shared_with[v] for v in dropped},
        )


class SessionEvidence(Frozen):
    """A session's unmasking data: the revealed shares, the survivors, the dropped sites' share recipients."""

    params: SessionParams
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    s_pks: dict[str, B64]
    replies: dict[str, UnmaskReply]
    shared_with: dict[str, tuple[str, ...]]


def unmask_total(evidence: SessionEvidence, masked_total: np.ndarray) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked inputs (uint64, wrapping at 2^64 or
    reduced mod 2^bits) and the revealed shares (pure). The coordinator holds that sum as the inputs arrive;
    a verifier adds up the archived inputs and reruns it to check the aggregate the transcript records.
    """
    p, t = evidence.params, evidence.params.threshold
    graph = p.neighbours() if evidence.dropped else {}  # the whole graph (n x degree) only where a site dropped
    seeds, subtract = [], []  # every mask to remove, gathered (and every abort decided) before any arithmetic
    # Each reply's shares, by whose secret they are: one pass over the replies (n x degree), not one per site
    seed_shares: dict[str, dict[int, bytes]] = {}
    key_shares: dict[str, dict[int, bytes]] = {}
    for v, r in evidence.replies.items():
        for u, share in r.seed_shares.items():
            seed_shares.setdefault(u, {})[p.x_of(v)] = share
        for u, share in r.key_shares.items():
            key_shares.setdefault(u, {})[p.x_of(v)] = share
    for u in evidence.survivors:
        shares = seed_shares.get(u, {})
        if len(shares) < t:
            raise SecAggAborted(f"only {len(shares)} shares of '{u}''s self mask arrived, fewer than {t}: aborting")
        seeds.append(shamir.combine(shares, threshold=t))
        subtract.append(True)
    for v in evidence.dropped:
        shares = key_shares.get(v, {})
        if len(shares) < t:
            raise SecAggAborted(f"only {len(shares)} shares of dropped '{v}''s mask key arrived, fewer than {t}: aborting")
        s_sk_v = keys.load_x25519_private(shamir.combine(shares, threshold=t))
        for u in evidence.survivors:
            if u in graph[v] and u in evidence.shared_with[v]:
                seeds.append(_pairwise_seed(s_sk_v, evidence.s_pks[u], p, u, v))
                subtract.append(u < v)  # undo what u added
    # total = sum of the masked inputs - the masks, mod 2^bits, as uint64, in one cache-blocked pass
    total = np.empty(p.length, dtype=np.uint64)
    prg.mask_sum(total, seeds, bits=p.bits, subtract=subtract, inputs=[masked_total], reduce=True)
    return total
