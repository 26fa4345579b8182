"""The GPU fast plane end to end (expert ranks in their own processes on the GPUs, attention on cuda:0):
first tokens and logprobs bitwise equal to gRPC bytes and CUDA IPC, auto picks it, the rings carry the
dispatches (the captured expert steps of every bucket with auto, and mixed with the eager path above 256
rows with fast; armed before the descriptor by default, launched on its arrival with
``ASAP_GPU_ARMED_STEPS=0``), and through the attention rank's hot path (``ASAP_GPU_HOT_PATH=1``); and a poisoned
flag releases a stream that waits on it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from asap.dataplane.gpu_flags import driver_flags, flags_available, poison_value
from tests.gpu.test_cuda_dataplane import _reference, _run

pytestmark = pytest.mark.skipif(
    not flags_available(), reason="needs a CUDA GPU and cuda.bindings (stream flags)"
)


@pytest.mark.parametrize("ranks", [1, 2])
async def test_fast_plane_matches_grpc_cuda_ipc_and_reference(
    gpu_model_dir: Path, ranks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    via_grpc, _ = await _run(gpu_model_dir, "grpc", prompts, ranks)
    via_ipc, _ = await _run(gpu_model_dir, "cuda-ipc", prompts, ranks)
    with monkeypatch.context() as env:  # captured steps up to 256 rows, the eager path above
        env.setenv("ASAP_GPU_STEP_GRAPH_ROWS", "256")
        via_fast, fast = await _run(gpu_model_dir, "fast", prompts, ranks)
    via_auto, auto = await _run(gpu_model_dir, "auto", prompts, ranks)  # asserts auto chose "fast"
    with monkeypatch.context() as env:  # captured steps launched on arrival, copied out on completion
        env.setenv("ASAP_GPU_ARMED_STEPS", "0")
        env.setenv("ASAP_GPU_PREFETCH", "0")
        via_on_arrival, _ = await _run(gpu_model_dir, "auto", prompts, ranks)
    assert via_on_arrival == via_auto
    print("fast", via_fast, fast, "\nauto", auto)
    assert fast["fast_exchanges"] > 0 and auto["fast_exchanges"] > 0
    assert fast["inline"] == 0 and fast["region"] > 0
    assert via_fast == via_grpc == via_ipc == via_auto
    reference = _reference(gpu_model_dir, prompts, ranks)
    assert [t for t, _ in via_fast] == [t for t, _ in reference]
    with monkeypatch.context() as env:  # the attention rank's hot path (compute thread posts and polls)
        env.setenv("ASAP_GPU_HOT_PATH", "1")
        via_hot, hot = await _run(gpu_model_dir, "fast", prompts, ranks)
    assert hot["direct_batches"] > 0 and fast["direct_batches"] == 0
    assert via_hot == via_grpc


@pytest.mark.parametrize("ranks", [1, 2])
async def test_hot_path_early_results_and_fills_match_grpc(
    gpu_model_dir: Path, ranks: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path with the lean fill (``ASAP_GPU_LEAN_FILL=1``), with early results on top
    (``ASAP_GPU_HOST_FREE=1``: tickets settled with the prefetched copy, the completion checked one step
    later), with the device-written done flag too, and the fill of before: first tokens and logprobs
    bitwise equal to gRPC bytes."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 9, 200, 1500)]
    via_grpc, _ = await _run(gpu_model_dir, "grpc", prompts, ranks)
    with monkeypatch.context() as env:
        env.setenv("ASAP_GPU_HOT_PATH", "1")
        env.setenv("ASAP_GPU_LEAN_FILL", "1")
        via_lean, _ = await _run(gpu_model_dir, "fast", prompts, ranks)
        env.setenv("ASAP_GPU_HOST_FREE", "1")
        via_early, early = await _run(gpu_model_dir, "fast", prompts, ranks)
        env.setenv("ASAP_GPU_DEVICE_DONE", "1")
        via_early_done, early_done = await _run(gpu_model_dir, "fast", prompts, ranks)
    with monkeypatch.context() as env:
        env.setenv("ASAP_GPU_HOT_PATH", "1")
        env.setenv("ASAP_GPU_LEAN_FILL", "0")
        via_old_fill, old_fill = await _run(gpu_model_dir, "fast", prompts, ranks)
    print("early", early, "\nearly + device done", early_done, "\nold fill", old_fill)
    assert early["direct_batches"] > 0 and early["early_results"] > 0
    assert early_done["early_results"] > 0 and old_fill["early_results"] == 0
    assert via_lean == via_grpc
    assert via_early == via_grpc
    assert via_early_done == via_grpc
    assert via_old_fill == via_grpc


def test_poison_releases_a_waiting_stream() -> None:
    flags = driver_flags()
    word = torch.zeros(16, dtype=torch.int32, device="cuda:0")
    torch.cuda.synchronize()
    waiting = torch.cuda.Stream("cuda:0")  # type: ignore[no-untyped-call]
    flags.wait(waiting, int(word.data_ptr()), 7)  # nobody will write 7: a dead peer
    with torch.cuda.stream(waiting):
        word[1].fill_(1)  # queued behind the wait
    done = threading.Event()
    threading.Thread(target=lambda: (waiting.synchronize(), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # still blocked on the flag
    flags.write(torch.cuda.Stream("cuda:0"), int(word.data_ptr()), poison_value(7))  # type: ignore[no-untyped-call]
    assert done.wait(10)
    assert int(word[1]) == 1
