"""The span contract: names, attribute keys and trace-context helpers shared by every service.

Services, ``asap trace summarize`` and ``asap trace perfetto`` all rely on these names; change them here
only, and only together with the summary's accounting (``asap.telemetry.summary``).

How the traces of one request fit together:

- ``scheduler.request`` is the root of the request's trace (or a child of the client's
  ``asap.client.prefill`` when the request carried a ``traceparent``); ``scheduler.queue`` is its child.
- ``scheduler.batch`` is one span per batch; it starts its own trace and **links** to the
  ``scheduler.request`` span of every request in the batch. Its context travels in
  ``BatchAssignment.trace``; each request's context travels in ``PromptInput.trace``.
- ``attention.batch`` is a child of ``scheduler.batch`` (context from ``BatchAssignment.trace``) and links
  to each request's context (``PromptInput.trace``). ``attention.layer``, ``attention.dispatch``,
  ``attention.combine_wait`` and ``attention.sample`` are its children.
- ``attention.dispatch`` injects its own context into every ``DispatchChunk.trace`` it sends, so the
  expert-side spans of that chunk (``expert.queue``, ``sync.barrier_wait``, ``expert.compute``,
  ``expert.combine_send``) are its children, in the same trace, although the stream is shared.

A request's spans are therefore: its own trace, plus every span that links to it and that span's
descendants. Trace context travels as W3C ``traceparent``/``tracestate`` strings (proto
``asap.v1.TraceContext``); an empty ``traceparent`` means "no context".

Works without OpenTelemetry installed: the helpers then return empty strings, ``None`` or an empty
context-less value, and nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span
    from opentelemetry.util.types import AttributeValue

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # pragma: no cover - the GPU image has no OpenTelemetry
    _trace = None  # type: ignore[assignment]
    _PROPAGATOR = None

# --- span names -------------------------------------------------------------------------------------
# Client SDK: one prefill call, from sending the request to receiving the response (retries included).
CLIENT_PREFILL = "asap.client.prefill"
# Scheduler: one request, arrival -> response sent. Root of the request's trace unless the client sent a
# traceparent. Attributes: asap.request_id, asap.mode, asap.tokens (prompt length), asap.rank (placement).
SCHEDULER_REQUEST = "scheduler.request"
# Scheduler: one request, arrival -> its batch is sent to an attention rank. Child of scheduler.request.
SCHEDULER_QUEUE = "scheduler.queue"
# Scheduler: one batch, sent to its rank -> result received. Links to every request's scheduler.request.
# Attributes: asap.request_ids, asap.rank, asap.tokens, asap.mode.
SCHEDULER_BATCH = "scheduler.batch"
# Attention rank: one batch, received -> results sent. Child of scheduler.batch, links to each request.
# Attributes: asap.request_ids, asap.rank, asap.tokens, asap.micro_batch.
ATTENTION_BATCH = "attention.batch"
# Attention rank: attention compute of one layer including the router (and shared experts). asap.layer.
ATTENTION_LAYER = "attention.layer"
# Attention rank: encoding + send of one layer's chunk(s) to one expert rank.
# Attributes: asap.layer, asap.expert_rank, asap.tokens, asap.micro_batch.
ATTENTION_DISPATCH = "attention.dispatch"
# Attention rank: awaiting all combine results of one layer (exchange start -> last partial received;
# the dispatch sends of the layer overlap its start). Attributes: asap.layer, asap.micro_batch.
ATTENTION_COMBINE_WAIT = "attention.combine_wait"
# Attention rank: final norm, lm_head and sampling of the batch's first tokens.
ATTENTION_SAMPLE = "attention.sample"
# Expert rank: one chunk from arrival (decoded) to the start of the computation covering it.
# Attributes: asap.layer, asap.tokens, asap.attention_rank, asap.micro_batch, asap.transfer_ns.
EXPERT_QUEUE = "expert.queue"
# Expert rank: the expert computation that covers the chunk (may cover other chunks too).
# Attributes: asap.layer, asap.tokens.
EXPERT_COMPUTE = "expert.compute"
# Expert rank: encoding + send of the chunk's CombineChunk.
EXPERT_COMBINE_SEND = "expert.combine_send"
# Expert rank, sync mode only: the chunk waits for the other attention ranks' chunks of the same
# step/layer. Attributes: asap.layer, asap.step.
SYNC_BARRIER_WAIT = "sync.barrier_wait"

SPAN_NAMES: tuple[str, ...] = (
    CLIENT_PREFILL,
    SCHEDULER_REQUEST,
    SCHEDULER_QUEUE,
    SCHEDULER_BATCH,
    ATTENTION_BATCH,
    ATTENTION_LAYER,
    ATTENTION_DISPATCH,
    ATTENTION_COMBINE_WAIT,
    ATTENTION_SAMPLE,
    EXPERT_QUEUE,
    EXPERT_COMPUTE,
    EXPERT_COMBINE_SEND,
    SYNC_BARRIER_WAIT,
)

# --- attribute keys ---------------------------------------------------------------------------------
REQUEST_ID = "asap.request_id"  # str
REQUEST_IDS = "asap.request_ids"  # list[str]
LAYER = "asap.layer"  # int, 0-based decoder layer
MICRO_BATCH = "asap.micro_batch"  # int, unique per attention rank
TOKENS = "asap.tokens"  # int, token rows covered by the span
RANK = "asap.rank"  # int, the attention rank a batch runs on
EXPERT_RANK = "asap.expert_rank"  # int
ATTENTION_RANK = "asap.attention_rank"  # int
STEP = "asap.step"  # int, sync-mode global step
MODE = "asap.mode"  # str: async | sync | sync-chunked
TRANSFER_NS = "asap.transfer_ns"  # int, sender clock -> receiver clock of one chunk

# --- service names ----------------------------------------------------------------------------------
SCHEDULER_SERVICE = "asap-scheduler"


def attention_service(rank: int) -> str:
    """Service name of attention rank ``rank``."""
    return f"asap-attention-{rank}"


def expert_service(rank: int) -> str:
    """Service name of expert rank ``rank``."""
    return f"asap-expert-{rank}"


# --- trace context ----------------------------------------------------------------------------------
class TraceCarrier(Protocol):
    """Anything with W3C trace-context string fields, e.g. ``asap.v1.TraceContext``."""

    traceparent: str
    tracestate: str


def inject(context: Context | None = None) -> tuple[str, str]:
    """``(traceparent, tracestate)`` of the current span, or of ``context``'s span when given;
    ``("", "")`` when there is none."""
    if _PROPAGATOR is None:
        return "", ""
    if not _trace.get_current_span(context).get_span_context().is_valid:
        return "", ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def context_of(span: Span) -> Context | None:
    """A context whose current span is ``span``: the explicit parent for spans started elsewhere (another
    task, the compute thread) and what :func:`inject` takes. ``None`` without OpenTelemetry."""
    if _trace is None:
        return None
    return _trace.set_span_in_context(span)


def set_error(span: Span, message: str) -> None:
    """Mark ``span`` failed with ``message`` (status ERROR)."""
    if _trace is not None:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, message))


def record(
    name: str,
    parent: Context | None,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> None:
    """Record a finished span ``name`` under ``parent`` from times measured elsewhere (``time.time_ns``).

    For work timed where no span can be kept open (the compute thread, an executor's queue). ``parent``
    ``None`` records nothing: a span without an explicit parent would attach to whatever is current.
    """
    if parent is None:
        return
    from asap.telemetry import setup

    span = setup.get_tracer().start_span(name, context=parent, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(start_ns, end_ns))


def inject_into(carrier: TraceCarrier) -> None:
    """Write the current span's context into ``carrier`` (e.g. ``chunk.trace``); no-op when none."""
    traceparent, tracestate = inject()
    if traceparent:
        carrier.traceparent = traceparent
        carrier.tracestate = tracestate


def extract(traceparent: str, tracestate: str = "") -> Context | None:
    """Context whose current span is the remote parent described by ``traceparent``.

    Returns ``None`` for an empty or malformed ``traceparent`` (and without OpenTelemetry), which
    ``tracer.start_as_current_span(..., context=None)`` treats as "use the current context".
    """
    if _PROPAGATOR is None or not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    if not _trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def extract_from(carrier: TraceCarrier) -> Context | None:
    """:func:`extract` reading ``carrier.traceparent``/``carrier.tracestate``."""
    return extract(carrier.traceparent, carrier.tracestate)


def link_from(traceparent: str, tracestate: str = "") -> Link | None:
    """A span link to the remote span described by ``traceparent``; ``None`` when there is none."""
    context = extract(traceparent, tracestate)
    if context is None:
        return None
    return _trace.Link(_trace.get_current_span(context).get_span_context())


def links_from(carriers: Iterable[TraceCarrier]) -> list[Link]:
    """Links to every carrier that holds a context (e.g. ``[p.trace for p in batch.prompts]``)."""
    links = []
    for carrier in carriers:
        link = link_from(carrier.traceparent, carrier.tracestate)
        if link is not None:
            links.append(link)
    return links
