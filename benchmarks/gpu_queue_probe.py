"""Does a pending ``cuStreamWaitValue32`` hold other streams? One stream waits on a word of pinned host
memory; an event is recorded on each other stream and on the default stream; after 50 ms the ones that
have not passed share the waiting stream's hardware queue (or are the same CUDA stream: PyTorch's pool
hands out 32 round robin). A CPU store then releases the wait.

    CUDA_DEVICE_MAX_CONNECTIONS=8 python3 benchmarks/gpu_queue_probe.py dedicated 40
    python3 benchmarks/gpu_queue_probe.py pool 40          # torch.cuda.Stream() instead
    python3 benchmarks/gpu_queue_probe.py probe 40         # WaitStreams.take() until it refuses
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from asap.dataplane.gpu_flags import driver_flags
from asap.dataplane.gpu_streams import WaitStreams, dedicated_stream


def main() -> None:
    kind, n = sys.argv[1], int(sys.argv[2])
    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)
    flags = driver_flags()
    out: dict[str, object] = {
        "kind": kind,
        "n": n,
        "connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
    }
    if kind == "probe":
        pool = WaitStreams(dev, budget=n)
        pool.plain()
        pool.critical.append(torch.cuda.Stream(dev))  # type: ignore[no-untyped-call]
        taken = []
        started = time.monotonic()
        while (s := pool.take()) is not None:
            taken.append(s)
        out.update(taken=len(taken), rejected=pool.rejected, seconds=round(time.monotonic() - started, 3))
        streams = [pool.critical[0], *taken]
    elif kind == "pool":
        streams = [torch.cuda.Stream(dev) for _ in range(n)]  # type: ignore[no-untyped-call]
    else:
        streams = [dedicated_stream(dev) for _ in range(n)]
    word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    blocked_by: dict[int, list[int]] = {}
    for waiting in range(min(len(streams), 8)):
        word.numpy()[0] = 0
        flags.wait(streams[waiting], int(word.data_ptr()), 1)
        events = []
        for s in [*streams, torch.cuda.default_stream(dev)]:
            e = torch.cuda.Event()  # type: ignore[no-untyped-call]
            e.record(s)
            events.append(e)
        time.sleep(0.05)
        blocked_by[waiting] = [i for i, e in enumerate(events) if i != waiting and not e.query()]  # type: ignore[no-untyped-call]
        word.numpy()[0] = 1
        torch.cuda.synchronize()
    out["blocked_by_a_wait_on"] = blocked_by
    out["default_index"] = len(streams)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
