"""The state-transition rule, checked exhaustively and by property."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from bridge.calls import TERMINAL_STATES, CallRecord, CallState, Direction, TranscriptEntry, can_transition

NON_TERMINAL = [s for s in CallState if not s.terminal]
ORDER = [CallState.INITIATED, CallState.RINGING, CallState.ANSWERED, CallState.ACTIVE]


def test_terminal_is_final() -> None:
    for current, target in itertools.product(TERMINAL_STATES, CallState):
        assert not can_transition(current, target), (current, target)


def test_any_terminal_reachable_from_any_non_terminal() -> None:
    for current, target in itertools.product(NON_TERMINAL, TERMINAL_STATES):
        assert can_transition(current, target)


def test_speaking_and_listening_cycle() -> None:
    assert can_transition(CallState.SPEAKING, CallState.LISTENING)
    assert can_transition(CallState.LISTENING, CallState.SPEAKING)


def test_transferring_returns_to_the_conversation_or_ends_transferred() -> None:
    for talk in (CallState.SPEAKING, CallState.LISTENING):
        assert can_transition(talk, CallState.TRANSFERRING)
        assert can_transition(CallState.TRANSFERRING, talk)
    assert can_transition(CallState.ACTIVE, CallState.TRANSFERRING)
    assert not can_transition(CallState.TRANSFERRING, CallState.TRANSFERRING)
    assert not can_transition(CallState.TRANSFERRING, CallState.ACTIVE)
    assert can_transition(CallState.TRANSFERRING, CallState.TRANSFERRED)
    assert CallState.TRANSFERRED.terminal


def test_record_with_a_transfer_round_trips() -> None:
    from bridge.calls import TransferRecord

    record = CallRecord(callId="c1", provider="mock", direction=Direction.OUTBOUND, state=CallState.TRANSFERRED,
                        from_="+15550001111", to="+15550002222", startedAt=1.0,
                        transfer=TransferRecord(mode="warm", to="+15550000006", startedAt=2.0, outcome="completed",
                                                endedAt=3.0, summary="Wants a refund."))
    assert CallRecord.from_json(record.to_json()) == record
    assert record.to_json()["transfer"]["to"] == "+15550000006"


def test_forward_only_otherwise() -> None:
    for i, current in enumerate(ORDER):
        for j, target in enumerate(ORDER):
            assert can_transition(current, target) == (j > i), (current, target)
        assert can_transition(current, CallState.SPEAKING)
        assert can_transition(current, CallState.LISTENING)
    for talk in (CallState.SPEAKING, CallState.LISTENING):
        for earlier in ORDER:
            assert not can_transition(talk, earlier)


@given(st.lists(st.sampled_from(list(CallState)), max_size=30))
def test_any_walk_keeps_invariants(targets: list[CallState]) -> None:
    """Apply arbitrary requested transitions: refused ones change nothing, and once terminal, forever terminal."""
    state = CallState.INITIATED
    rank = {s: i for i, s in enumerate(ORDER)} | {CallState.SPEAKING: 4, CallState.LISTENING: 4,
                                                  CallState.TRANSFERRING: 4}
    for target in targets:
        before = state
        if can_transition(state, target):
            state = target
        if before.terminal:
            assert state == before
        elif not state.terminal and state != before:
            assert rank[state] >= rank[before]


@given(st.text(), st.sampled_from(list(CallState)), st.floats(allow_nan=False, allow_infinity=False))
def test_record_round_trips_through_json(text: str, state: CallState, started: float) -> None:
    record = CallRecord(callId="c1", provider="mock", direction=Direction.INBOUND, state=state,
                        from_="+15550001111", to="+15550002222", startedAt=started,
                        transcript=[TranscriptEntry(1.0, "user", text)], metadata={"mode": "conversation"})
    assert CallRecord.from_json(record.to_json()) == record


def test_typed_bookkeeping_reads_old_call_log_records_and_keeps_their_shape() -> None:
    from bridge.calls import CallMode, CallRecord

    old = {"callId": "c1", "provider": "plivo", "direction": "outbound", "state": "answered", "from": "+1",
           "to": "+2", "startedAt": 1.0, "providerCallId": "uuid-2",
           "metadata": {"mode": "notify", "initialMessage": "Hi", "mediaAttached": True,
                        "previousProviderCallIds": ["req-1"], "turnCount": 0}}
    call = CallRecord.from_json(old)
    assert (call.mode, call.initial_message, call.media_attached, call.previous_provider_call_ids) == (
        CallMode.NOTIFY, "Hi", True, ["req-1"])
    assert not call.initial_message_spoken
    call.media_attached = False
    call.initial_message_spoken = True
    call.mode = CallMode.CONVERSATION
    assert call.to_json()["metadata"] == {"mode": "conversation", "initialMessage": "Hi", "mediaAttached": False,
                                          "previousProviderCallIds": ["req-1"], "turnCount": 0,
                                          "initialMessageSpoken": True}
    bare = CallRecord.from_json({**old, "metadata": {}})
    assert (bare.mode, bare.initial_message, bare.media_attached, bare.previous_provider_call_ids) == (
        CallMode.CONVERSATION, "", False, [])


def test_json_text_is_to_json_without_the_copies() -> None:
    """The call log's fast path writes exactly what `to_json` describes, for a record using every field."""
    import json as _json

    from bridge.calls import ToolCallEntry, TranscriptEntry, TransferRecord, TurnRecord

    call = CallRecord(callId="c-1", provider="twilio", direction=Direction.INBOUND, state=CallState.LISTENING,
                      from_="+15550001234", to="+15550005678", startedAt=1000.0, providerCallId="CA1",
                      answeredAt=1001.5, transcript=[TranscriptEntry(1002.0, "user", "Hi ünïcode", False)],
                      toolCalls=[ToolCallEntry(1003.0, "call_1", "end_call", "{}", "ok", 2, True, True)],
                      turns=[TurnRecord(n=1, at=1002.1, mode="streaming", interrupted=True, sttMs=300.0, totalMs=1050.0)],
                      processedEventIds=["e1", "e2"], transfer=TransferRecord("cold", "+15550009999", 1004.0),
                      metadata={"mode": "conversation", "nested": {"list": [1, 2.5, None]}})
    assert _json.loads(call.json_text()) == _json.loads(_json.dumps(call.to_json()))
    assert CallRecord.from_json(_json.loads(call.json_text())) == call
