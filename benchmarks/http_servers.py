"""Which HTTP server library should carry the scheduler's OpenAI front door? Latency under open-loop load.

Each candidate serves the same tiny ``POST /v1/completions`` handler (parse the JSON body, yield to the
loop once, answer a completion-shaped JSON object) on uvloop, in its own process, embedded the way the
scheduler would embed it (started on an already-running event loop). One client process (aiohttp's
client, the same for every candidate) sends Poisson arrivals at each rate over keep-alive connections and
records each request's latency from its scheduled send time. Candidates alternate rate by rate so they
share the machine's noise.

    PYTHONPATH=$PWD:/tmp/httpbench-pkgs python benchmarks/http_servers.py --rates 250,500,1000,2000

Candidates not in the venv (starlette, uvicorn, hypercorn) are read from ``PYTHONPATH``; install them with
``pip install --target /tmp/httpbench-pkgs --no-deps starlette uvicorn httptools hypercorn h2 hpack
hyperframe priority wsproto``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

ANSWER = {
    "id": "cmpl-0",
    "object": "text_completion",
    "created": 0,
    "model": "tiny",
    "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
}
CANDIDATES = ("aiohttp", "starlette+uvicorn", "starlette+hypercorn")


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0)
        return web.json_response({**ANSWER, "model": body.get("model", "tiny")})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        await asyncio.sleep(0)
        return JSONResponse({**ANSWER, "model": body.get("model", "tiny")})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


async def _serve_uvicorn(port: int) -> None:
    import uvicorn

    config = uvicorn.Config(
        _starlette_app(),
        host="127.0.0.1",
        port=port,
        loop="none",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    await uvicorn.Server(config).serve()


async def _serve_hypercorn(port: int) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    await serve(_starlette_app(), config)


def serve(candidate: str, port: int) -> None:
    import uvloop

    main = {
        "aiohttp": _serve_aiohttp,
        "starlette+uvicorn": _serve_uvicorn,
        "starlette+hypercorn": _serve_hypercorn,
    }
    uvloop.run(main[candidate](port))


async def _load(port: int, rate: float, requests: int, seed: int) -> dict[str, float]:
    import aiohttp

    rng = random.Random(seed)
    gaps = [rng.expovariate(rate) for _ in range(requests)]
    url = f"http://127.0.0.1:{port}/v1/completions"
    payload = {"model": "tiny", "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 1}
    latencies: list[float] = []
    failed = 0
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as session:
        for _ in range(20):  # warm the connection pool
            async with session.post(url, json=payload) as response:
                await response.read()

        async def one(scheduled: float) -> None:
            nonlocal failed
            try:
                async with session.post(url, json=payload) as response:
                    await response.read()
                    if response.status != 200:
                        failed += 1
                        return
            except aiohttp.ClientError:
                failed += 1
                return
            latencies.append((loop.time() - scheduled) * 1e3)

        start = loop.time()
        at = start
        tasks = []
        for gap in gaps:
            at += gap
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
        elapsed = loop.time() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "rate_rps": rate,
        "achieved_rps": len(latencies) / elapsed,
        "failed": failed,
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) if latencies else float("nan"),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rates", default="250,500,1000,2000")
    parser.add_argument("--seconds", type=float, default=5.0, help="per rate and candidate")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    import uvloop

    candidates = args.candidates.split(",")
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for candidate in candidates:
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", candidate, "--port", str(port)], env=os.environ
            )
            servers[candidate] = (proc, port)
            _wait_port(port)
        results: dict[str, list[dict[str, float]]] = {c: [] for c in candidates}
        for rate in (float(r) for r in args.rates.split(",")):
            for candidate in candidates:
                result = uvloop.run(
                    _load(servers[candidate][1], rate, int(rate * args.seconds), seed=int(rate))
                )
                results[candidate].append(result)
                print(
                    f"{candidate:22s} {rate:7.0f} rps  achieved {result['achieved_rps']:7.1f}  "
                    f"p50 {result['p50_ms']:6.2f}  p90 {result['p90_ms']:6.2f}  p99 {result['p99_ms']:7.2f} ms  "
                    f"failed {result['failed']:.0f}",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
