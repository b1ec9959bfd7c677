"""The coordinator's secure-aggregation sessions: one SecAgg+ session per phase of a round.

Under secure aggregation a phase's request only gathers who is ready; the
sum then goes through the SecAgg+ stages (``advertise_keys``,
``share_keys``, ``collect_masked``, ``consistency_check``, ``unmask``),
each closed here, until the sum alone is unmasked. The functions hold no
state of their own: the session lives in the phase's ``PhaseState``, and
what the coordinator keeps (its transcript entries, the fit sessions'
evidence, the graph plans) is passed in and appended to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from consortium.errors import ConfigError, ProtocolError
from consortium.protocol.sitedp import SiteLevelDP
from consortium.protocol import contributions as c
from consortium.protocol import messages as m
from consortium.protocol.coordinator_rounds import PhaseResult, PhaseState, SecureAggregation
from consortium.runs import MaskedSpool
from consortium.secagg import SecAggServer, make_session
from consortium.secagg.encoding import DiscreteGaussianEncoding
from consortium.secagg.graph import plan_graph
from consortium.secagg.messages import STAGES
from consortium.transcript.records import LogRecord, SessionArchive

COORDINATOR = m.COORDINATOR


def take_reply(st: PhaseState, sender: str, msg: m.BaseModel) -> None:
    """One site's message for the session's current stage; ProtocolError if it does not belong there."""
    server = st.server
    assert server is not None
    if st.stage == "advertise_keys" and isinstance(msg, m.SecAggAdvert):
        server.add_advert(sender, msg.advert)
    elif st.stage == "share_keys" and isinstance(msg, m.SecAggShares):
        server.add_shares(sender, msg.bundle)
    elif st.stage == "collect_masked" and isinstance(msg, m.SecAggMasked):
        server.add_masked(sender, msg.masked)
        st.commitments[sender] = msg.masked.vector.sha256
    elif st.stage == "consistency_check" and isinstance(msg, m.SecAggAck):
        server.add_ack(sender, msg.ack)
    elif st.stage == "unmask" and isinstance(msg, m.SecAggReveal):
        server.add_unmask(sender, msg.reply)
    else:
        raise ProtocolError(f"sent '{msg.kind}' at stage {st.stage}")


def close_stage(
    st: PhaseState,
    sec: SecureAggregation,
    *,
    rnd: int,
    site_dp: SiteLevelDP | None,
    length: Callable[[], int],
    log: list[LogRecord],
    archives: list[SessionArchive],
    plans: list[dict[str, object]],
    spool: Callable[[int, str], MaskedSpool] | None = None,
) -> PhaseResult | None:
    """Close one stage of the phase's session; a result when the sum is known (or the session aborted).

    ``length`` gives the phase's vector length (asked only when a session opens). The commitments
    to the masked inputs go to ``log``, a finished fit session's evidence to ``archives`` (its masked
    inputs to the ``spool`` made for its round and session as they arrive, when there is one), and each
    session's graph to ``plans``. A session that cannot go on (too few sites, or no safe plan for
    those left) ends in a result without a sum, whose reason says where it stopped.
    """
    try:
        if st.stage == "request":
            return _open(st, sec, rnd=rnd, site_dp=site_dp, length=length, plans=plans, spool=spool)
        server = st.server
        assert server is not None
        sid = server.params.session_id
        if st.stage == "advertise_keys":
            st.outgoing = {u: m.SecAggRoster(session_id=sid, roster=r) for u, r in server.close_advertise().items()}
        elif st.stage == "share_keys":
            st.outgoing = {u: m.SecAggDeliver(session_id=sid, delivery=d) for u, d in server.close_share_keys().items()}
        elif st.stage == "collect_masked":
            survivors = server.close_collect_masked()
            st.outgoing = {u: m.SecAggSurvivors(session_id=sid, survivors=survivors) for u in survivors.survivors}
            log.append(LogRecord("masked_inputs", rnd, COORDINATOR, {
                "phase": st.phase,
                "session_id": sid,
                "survivors": list(survivors.survivors),
                "commitments": {u: st.commitments[u] for u in survivors.survivors},
            }))
        elif st.stage == "consistency_check":
            st.outgoing = {u: m.SecAggUnmask(session_id=sid, request=r) for u, r in server.close_consistency().items()}
        else:
            outcome = server.finish()
            assert st.encoding is not None
            if st.phase == "fit":
                masked = st.spool if st.spool is not None else server.masked_inputs()
                archives.append(SessionArchive(rnd, server.evidence(), masked, st.encoding))
            return PhaseResult(st.encoding.decode_sum(outcome.total, len(outcome.included)), list(outcome.included))
    except (ProtocolError, ConfigError) as exc:  # aborted: too few sites, or no safe plan for those left
        if st.spool is not None:
            st.spool.discard()
        return PhaseResult(None, [], f"secure aggregation aborted at {st.stage}: {exc}")
    st.stage = STAGES[STAGES.index(st.stage) + 1]
    return None


def _open(
    st: PhaseState,
    sec: SecureAggregation,
    *,
    rnd: int,
    site_dp: SiteLevelDP | None,
    length: Callable[[], int],
    plans: list[dict[str, object]],
    spool: Callable[[int, str], MaskedSpool] | None,
) -> PhaseResult | None:
    """Open the phase's session over the sites that answered its request: graph, encoding, start messages."""
    ready = sorted(st.ready)
    if len(ready) < 2:
        return PhaseResult(None, [], f"only {len(ready)} site(s) ready: secure aggregation needs at least 2")
    plan = plan_graph(len(ready), dropout_rate=sec.dropout_rate, corruption_rate=sec.corruption_rate)
    n = length()
    if st.phase == "fit":
        if site_dp is not None:
            event = site_dp.event()
            st.encoding = site_dp.encoding(event, len(ready), sec.bits)
            if isinstance(st.encoding, DiscreteGaussianEncoding):  # every sum unmasked must carry enough noise
                st.encoding.check_capacity(len(ready), n)
                need = st.encoding.min_sum
                if len(ready) < need:
                    return PhaseResult(None, [], f"only {len(ready)} site(s) ready: the distributed noise needs {need}")
                plan = dataclasses.replace(plan, threshold=max(plan.threshold, need))
        else:
            st.encoding = c.fit_encoding(sec.update_clip, len(ready), sec.bits)
    elif st.phase == "evaluate":
        st.encoding = c.eval_encoding()
    else:
        st.encoding = c.setup_encoding()
    params = make_session(ready, n, bits=st.encoding.bits, plan=plan)
    if st.phase == "fit" and spool is not None:
        st.spool = spool(rnd, params.session_id)
    st.server = SecAggServer(params, sec.identity, sec.directory, keep=None if st.spool is None else st.spool.add)
    start = m.SecAggStart(phase=st.phase, params=params, encoding=st.encoding)
    st.outgoing = {u: start for u in ready}
    st.stage = "advertise_keys"
    plans.append({"phase": st.phase, "round": rnd, "graph": plan.kind, "degree": plan.degree, "threshold": plan.threshold})
    return None
