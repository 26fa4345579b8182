"""AttentionClient without attention ranks: the RunBatch message it builds, and a rank that is not there."""

from __future__ import annotations

import socket

import pytest

from asap.errors import Unavailable
from asap.syncstep import SyncStep
from asap.v1 import attention_pb2
from scheduler_svc.attention_client import AttentionClient
from scheduler_svc.requests import RankResultItem, ScheduledRequest


def _unused_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_the_sync_step_goes_on_the_wire_as_step_and_participants() -> None:
    client = AttentionClient([_unused_target()])
    sent: list[attention_pb2.BatchAssignment] = []

    async def run(assignment: attention_pb2.BatchAssignment) -> attention_pb2.BatchResult:
        sent.append(assignment)
        return attention_pb2.BatchResult(
            batch_id=assignment.batch_id,
            results=[attention_pb2.PromptResult(first_token_id=5, prompt_tokens=3)],
        )

    client.links[0].run = run  # type: ignore[method-assign]
    try:
        request = ScheduledRequest("r", [1, 2, 3])
        (item,) = await client.run_batch(0, 7, [request], sync=SyncStep(3, 2))
        assert isinstance(item, RankResultItem) and item.first_token_id == 5
        await client.run_batch(0, 8, [request])
    finally:
        await client.close()
    assert [(a.batch_id, a.step, a.sync_participants) for a in sent] == [(7, 3, 2), (8, 0, 0)]


async def test_a_rank_nobody_listens_on_fails_the_batch_with_unavailable_naming_it() -> None:
    target = _unused_target()
    client = AttentionClient([target])
    try:
        with pytest.raises(Unavailable, match=f"attention rank 0 at {target}"):
            await client.run_batch(0, 1, [ScheduledRequest("r", [1])])
        assert not await client.probe(0)
    finally:
        await client.close()
        await client.close()  # idempotent
