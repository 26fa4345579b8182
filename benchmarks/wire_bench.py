"""Wire microbenchmark: dispatch + combine round trips over loopback grpc.aio, against raw grpc bytes.

A server process hosts the real ``asap.v1.Expert`` service with a bench servicer (decode_dispatch, then
combine_chunk echoing the hidden rows: no expert math) and a raw bytes echo method (identity
serializers). The client, in this process, times for each token count and chunk size:

- wire: dispatch_chunks -> Exchange stream -> CombineAssembler, one round trip per iteration;
- raw: the same number of messages of the same sizes as the serialized DispatchChunks, echoed back.

Usage: python benchmarks/wire_bench.py --tokens 1024,8192 --hidden 4096 --iters 20 --json OUT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch

from asap.v1 import expert_pb2, expert_pb2_grpc
from asap.wire import CombineAssembler, combine_chunk, decode_dispatch, dispatch_chunks

MIB = 1024 * 1024
TOP_K = 8
NUM_EXPERTS = 256
NUM_LAYERS = 64
DTYPE = torch.bfloat16
RAW_METHOD = "/asap.bench.Raw/Echo"
MAX_MESSAGE = 64 * MIB
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class BenchExpert(expert_pb2_grpc.ExpertServicer):
    """Decodes every DispatchChunk as an expert rank would and echoes its rows back."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size

    async def Exchange(
        self, request_iterator: AsyncIterator[expert_pb2.DispatchChunk], context: Any
    ) -> AsyncIterator[expert_pb2.CombineChunk]:
        async for msg in request_iterator:
            dispatch = decode_dispatch(
                msg,
                hidden_size=self.hidden_size,
                dtype=DTYPE,
                num_layers=NUM_LAYERS,
                num_experts=NUM_EXPERTS,
                top_k=TOP_K,
            )
            yield combine_chunk(dispatch, dispatch.hidden)


async def raw_echo(request_iterator: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for payload in request_iterator:
        yield payload


async def serve(hidden_size: int) -> None:
    """Run the bench server on a free loopback port; print the port; stop when stdin closes."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    expert_pb2_grpc.add_ExpertServicer_to_server(BenchExpert(hidden_size), server)  # type: ignore[no-untyped-call]
    raw = grpc.stream_stream_rpc_method_handler(raw_echo)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("asap.bench.Raw", {"Echo": raw}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await server.stop(grace=1)


async def wire_round_trip(
    call: Any,
    tokens: int,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    chunk_bytes: int,
    micro_batch: int,
) -> tuple[float, float]:
    """One dispatch and its combine; returns (total seconds, client encode seconds)."""
    start = time.perf_counter()
    chunks = dispatch_chunks(
        micro_batch=micro_batch,
        layer=1,
        attention_rank=0,
        hidden=hidden,
        expert_ids=ids,
        weights=weights,
        max_chunk_bytes=chunk_bytes,
    )
    encoded = time.perf_counter()
    assembler = CombineAssembler(tokens, hidden.shape[1], DTYPE, micro_batch=micro_batch, layer=1)

    async def send() -> None:
        for chunk in chunks:
            await call.write(chunk)

    writer = asyncio.create_task(send())
    while not assembler.add(await call.read()):
        pass
    await writer
    assembler.result()
    return time.perf_counter() - start, encoded - start


async def raw_round_trip(call: Any, payloads: list[bytes]) -> float:
    """The same message sizes as plain bytes, echoed; returns seconds."""
    start = time.perf_counter()

    async def send() -> None:
        for payload in payloads:
            await call.write(payload)

    writer = asyncio.create_task(send())
    for _ in payloads:
        await call.read()
    await writer
    return time.perf_counter() - start


async def run_client(
    port: int, tokens_list: list[int], hidden_size: int, chunk_mibs: list[int], iters: int, warmup: int
) -> list[dict[str, Any]]:
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        stub = expert_pb2_grpc.ExpertStub(channel)  # type: ignore[no-untyped-call]
        wire_call = stub.Exchange()
        raw_call = channel.stream_stream(RAW_METHOD, None, None)()  # type: ignore[call-arg]
        micro_batch = 0
        for tokens in tokens_list:
            gen = torch.Generator().manual_seed(tokens)
            hidden = torch.randn(tokens, hidden_size, generator=gen).to(DTYPE)  # [T, H]
            ids = torch.randint(-1, NUM_EXPERTS, (tokens, TOP_K), generator=gen, dtype=torch.int32)  # [T, K]
            weights = torch.rand(tokens, TOP_K, generator=gen)  # [T, K]
            payload_bytes = tokens * hidden_size * 2 * 2 + tokens * TOP_K * 8  # out: h+ids+w, back: h
            for chunk_mib in chunk_mibs:
                chunks = dispatch_chunks(
                    micro_batch=0,
                    layer=1,
                    attention_rank=0,
                    hidden=hidden,
                    expert_ids=ids,
                    weights=weights,
                    max_chunk_bytes=chunk_mib * MIB,
                )
                payloads = [bytes(c.ByteSize()) for c in chunks]
                raw_bytes = 2 * sum(len(p) for p in payloads)
                wire_s, encode_s, raw_s = [], [], []
                for i in range(warmup + iters):
                    micro_batch += 1
                    total, encode = await wire_round_trip(
                        wire_call, tokens, hidden, ids, weights, chunk_mib * MIB, micro_batch
                    )
                    raw = await raw_round_trip(raw_call, payloads)
                    if i >= warmup:
                        wire_s.append(total)
                        encode_s.append(encode)
                        raw_s.append(raw)
                wire_ms = statistics.median(wire_s) * 1e3
                raw_ms = statistics.median(raw_s) * 1e3
                row = {
                    "tokens": tokens,
                    "hidden": hidden_size,
                    "chunk_mib": chunk_mib,
                    "chunks": len(chunks),
                    "payload_mib_both_ways": payload_bytes / MIB,
                    "wire_ms_p50": wire_ms,
                    "wire_ms_min": min(wire_s) * 1e3,
                    "encode_ms_p50": statistics.median(encode_s) * 1e3,
                    "wire_gbps": payload_bytes / wire_ms / 1e6,
                    "raw_ms_p50": raw_ms,
                    "raw_gbps": raw_bytes / raw_ms / 1e6,
                }
                row["wire_over_raw"] = row["wire_gbps"] / row["raw_gbps"]
                results.append(row)
                print(
                    f"tokens {tokens:5d} chunk {chunk_mib:2d} MiB x{len(chunks):3d}: "
                    f"wire {wire_ms:7.2f} ms {row['wire_gbps']:5.2f} GB/s "
                    f"(encode {row['encode_ms_p50']:5.2f} ms) | "
                    f"raw {raw_ms:7.2f} ms {row['raw_gbps']:5.2f} GB/s | wire/raw {row['wire_over_raw']:.2f}",
                    flush=True,
                )
        await wire_call.done_writing()
        await raw_call.done_writing()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", default="1024,8192", help="comma list of token counts per dispatch")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--chunk-mib", default="1,2,4,16", help="comma list of max chunk sizes (MiB)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads per process; on 2 cores, more stalls copies behind the other process",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    if args.serve:
        asyncio.run(serve(args.hidden))
        return 0

    server = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            "--hidden",
            str(args.hidden),
            "--torch-threads",
            str(args.torch_threads),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        results = asyncio.run(
            run_client(
                port,
                [int(t) for t in args.tokens.split(",")],
                args.hidden,
                [int(c) for c in args.chunk_mib.split(",")],
                args.iters,
                args.warmup,
            )
        )
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    if args.json_out:
        meta = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "transport": "grpc.aio loopback, server in a separate process",
            "torch_threads": args.torch_threads,
        }
        with open(args.json_out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
