"""``asap simulate ARGS`` with every loop handle counted by what it runs: per expert dispatch, how many
``call_soon`` and ``call_at`` handles each kind of step makes (a task's steps are named by its coroutine,
a future's done callbacks by the callback), to stderr. Where the loop iterations per dispatch go, so
that a change to the services' steps can be aimed at the largest; the counts are exact, not sampled.
Dispatches are counted as the expert ranks' sessions receive them (``ExchangeSession.accept``); a timer
that runs ``loop.call_soon`` (a wait's wake-up kept one iteration after its timer) is named by what it
schedules.
    python benchmarks/sim_handle_census.py --compare async --model ... [simulate flags]
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
from typing import Any

from _simulate import run_simulate  # a sibling: these scripts run as `python benchmarks/NAME.py`

from asap.sim.loop import VirtualLoop
from expert_svc.exchange import ExchangeSession

counts: collections.Counter[tuple[str, str]] = collections.Counter()
dispatches = [0]


def _name(callback: Any, args: tuple[Any, ...] = ()) -> str:
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task step: {getattr(coro, '__qualname__', type(coro).__name__)}"
    if isinstance(owner, VirtualLoop) and args:  # a timer whose callback is ``loop.call_soon``
        return f"call_soon of {_name(args[0], args[1:])}"
    return getattr(callback, "__qualname__", type(callback).__name__)


def _wrap(kind: str, original: Any) -> Any:
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        at = 0 if kind == "call_soon" else 1
        counts[(kind, _name(args[at], args[at + 1 :]))] += 1
        return original(self, *args, **kwargs)

    return counted


def _report(top: int = int(os.environ.get("SIM_CENSUS_TOP", "30"))) -> None:
    n = max(dispatches[0], 1)
    total = sum(counts.values())
    print(
        f"expert dispatches {dispatches[0]}, handles {total} ({total / n:.2f} per dispatch)", file=sys.stderr
    )
    for (kind, name), count in counts.most_common(top):
        print(
            f"{count / n:6.2f} per dispatch  {100 * count / max(total, 1):5.1f}%  {kind:9s} {name}",
            file=sys.stderr,
        )


def main() -> int:
    VirtualLoop.call_soon = _wrap("call_soon", VirtualLoop.call_soon)  # type: ignore[method-assign]
    VirtualLoop.call_at = _wrap("call_at", VirtualLoop.call_at)  # type: ignore[method-assign]
    accept = ExchangeSession.accept

    def counting_accept(self: ExchangeSession, *args: Any, **kwargs: Any) -> Any:
        dispatches[0] += 1
        return accept(self, *args, **kwargs)

    ExchangeSession.accept = counting_accept  # type: ignore[method-assign]
    return run_simulate(sys.argv[1:], _report)


if __name__ == "__main__":
    raise SystemExit(main())
