import asyncio
from collections.abc import AsyncIterator

from asap.rpc.streams import answer_each, relay


async def _items(values: list[int], gate: asyncio.Event | None = None) -> AsyncIterator[int]:
    for value in values:
        yield value
    if gate is not None:
        await gate.wait()


def test_answer_each_queues_every_answer_then_none() -> None:
    async def main() -> list[int]:
        async def double(value: int) -> int:
            await asyncio.sleep(0.001 * (3 - value))  # later requests answer first
            return 2 * value

        active: set[asyncio.Task[None]] = set()
        answers = [
            item
            async for item in relay(
                lambda outbound: answer_each(_items([1, 2, 3]), double, outbound, also_track=active),
                name="test",
            )
        ]
        assert not active
        return answers

    assert sorted(asyncio.run(main())) == [2, 4, 6]


def test_answer_each_cancelled_cancels_its_tasks() -> None:
    async def main() -> bool:
        started = asyncio.Event()
        never = asyncio.Event()
        cancelled = False

        async def hang(value: int) -> int:
            nonlocal cancelled
            started.set()
            try:
                await never.wait()
            except asyncio.CancelledError:
                cancelled = True
                raise
            return value

        outbound: asyncio.Queue[int | None] = asyncio.Queue()
        producer = asyncio.create_task(answer_each(_items([1], gate=never), hang, outbound))
        await started.wait()
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        return cancelled

    assert asyncio.run(main())
