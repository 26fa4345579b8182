"""The servicer stamps a request's arrival on the services' clock (``asap.clock``), the clock the core
measures queue and TTFT times with; ``asap simulate`` installs a virtual one."""

from __future__ import annotations

import time
from pathlib import Path

from asap import clock
from asap.telemetry import spans
from asap.telemetry.otlpjson import load_spans
from asap.telemetry.setup import configure_tracing
from asap.v1 import scheduler_pb2
from scheduler_svc.requests import RequestResult, ScheduledRequest
from scheduler_svc.server import SchedulerServiceConfig, SchedulerServicer

VIRTUAL_NOW = 1_000_000.25  # far from any time.monotonic() of this host
TTFT_MS = 3.5


class RecordingCore:
    """Answers every request at once and keeps what it was given."""

    def __init__(self) -> None:
        self.submitted: list[ScheduledRequest] = []

    async def submit(self, request: ScheduledRequest) -> RequestResult:
        self.submitted.append(request)
        return RequestResult(request.request_id, 7, -0.5, [], len(request.token_ids), 0.0, TTFT_MS, 0)


class TokenIds:
    def token_ids(self, request: scheduler_pb2.PrefillRequest) -> list[int]:
        return list(request.tokens.ids)


def _servicer() -> tuple[SchedulerServicer, RecordingCore, scheduler_pb2.PrefillRequest]:
    core = RecordingCore()
    config = SchedulerServiceConfig(attention_targets=["a:1"])
    servicer = SchedulerServicer(core, TokenIds(), config)  # type: ignore[arg-type]
    request = scheduler_pb2.PrefillRequest(request_id="r1")
    request.tokens.ids.extend([1, 2, 3])
    return servicer, core, request


async def test_arrival_is_read_from_the_services_clock() -> None:
    servicer, core, request = _servicer()
    with clock.use(lambda: VIRTUAL_NOW):
        response = await servicer._prefill(request, None)
    assert response.first_token_id == 7
    (scheduled,) = core.submitted
    assert scheduled.arrival == VIRTUAL_NOW


async def test_with_tracing_the_request_span_starts_at_arrival_and_lasts_its_ttft(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    handle = configure_tracing("asap-scheduler", {"ASAP_TRACE_FILE": str(path)})
    servicer, core, request = _servicer()
    try:
        before_ns = time.time_ns()
        with clock.use(lambda: VIRTUAL_NOW):
            await servicer._prefill(request, None)
        after_ns = time.time_ns()
    finally:
        handle.shutdown()
    (scheduled,) = core.submitted
    assert scheduled.arrival == VIRTUAL_NOW
    (span,) = [s for s in load_spans(path) if s.name == spans.SCHEDULER_REQUEST]
    assert before_ns <= span.start_ns <= after_ns  # span times are wall time
    assert span.duration_ns == round(TTFT_MS * 1e6)  # ends at the TTFT measured from the same arrival
