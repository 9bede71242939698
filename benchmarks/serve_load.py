"""Load on `rgpt-rt serve` over loopback: N requests, C at a time; latency percentiles.

    python benchmarks/serve_load.py --bundle build/bundles/tiny --json serve_load.json
    python benchmarks/serve_load.py --url http://127.0.0.1:8080       # a server already running

Requests cycle through describe (plain and streamed), classify, refer, ask (streamed) and
chat completions (plain and streamed), about regions of the example image the page ships
(rgpt_rt/serve/static/example.png), so after the first request the image's vision result and
prefix are cached, as when a user points at one region after another. A request counts as an
error unless it is answered 200 and, when streamed, ends with its final event. Latency is from
sending the request to the last byte; "first delta" is when a streamed answer's first text
arrived. Prints a markdown table and writes JSON. Makes no request off this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from rgpt_rt.serve.example import SHAPES, example_path

BOXES = list(SHAPES.values())


def request_kinds(tokens: int) -> dict[str, tuple[str, dict, bool]]:
    """kind -> (path, body, streamed)."""
    image = base64.b64encode(example_path().read_bytes()).decode()
    chat_messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is <region1>?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ],
        }
    ]
    return {
        "describe": ("/v1/describe", {"image": image, "max_new_tokens": tokens}, False),
        "describe-stream": (
            "/v1/describe",
            {"image": image, "max_new_tokens": tokens, "stream": True},
            True,
        ),
        "classify": ("/v1/classify", {"image": image}, False),
        "refer": ("/v1/refer", {"image": image, "expression": "the red circle"}, False),
        "ask-stream": (
            "/v1/ask",
            {
                "image": image,
                "question": "What is <region1>?",
                "max_new_tokens": tokens,
                "stream": True,
            },
            True,
        ),
        "chat": ("/v1/chat/completions", {"messages": chat_messages, "max_tokens": tokens}, False),
        "chat-stream": (
            "/v1/chat/completions",
            {"messages": chat_messages, "max_tokens": tokens, "stream": True},
            True,
        ),
    }


def body_for(kind: str, body: dict, index: int) -> dict:
    """The request body of request `index`: its region(s) move round the example's shapes."""
    box = BOXES[index % len(BOXES)]
    if kind == "refer":
        return {**body, "boxes": [box, BOXES[(index + 1) % len(BOXES)]]}
    if kind.startswith("chat"):
        return {**body, "regions": [{"box": box}]}
    return {**body, "box": box}


async def one_request(client: httpx.AsyncClient, kind: str, path: str, body: dict, streamed: bool):
    started = time.perf_counter()
    first_delta = None
    error = None
    try:
        if not streamed:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                error = f"{response.status_code}: {response.text[:200]}"
        else:
            async with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                else:
                    event, last = "", ""
                    async for line in response.aiter_lines():
                        if line.startswith("event:"):
                            event = line[len("event:") :].strip()
                        elif line.startswith("data:"):
                            last = line[len("data:") :].strip()
                            if first_delta is None and has_text(event, last):
                                first_delta = time.perf_counter() - started
                    if event not in ("", "done") or (event == "" and last != "[DONE]"):
                        error = f"the stream did not end with its final event: {event} {last[:200]}"
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}"
    total = time.perf_counter() - started
    return {
        "kind": kind,
        "ms": total * 1000,
        "first_delta_ms": None if first_delta is None else first_delta * 1000,
        "error": error,
    }


def has_text(event: str, data: str) -> bool:
    """Whether a streamed event carries answer text: a task stream's delta, or an OpenAI chunk
    whose delta has content."""
    if event == "delta":
        return True
    if event or not data.startswith("{"):
        return False
    choices = json.loads(data).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


async def run_load(url: str, requests: int, concurrency: int, tokens: int, timeout: float) -> dict:
    kinds = request_kinds(tokens)
    names = list(kinds)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        for index, name in enumerate(names):  # warm-up, not counted: one of each kind
            path, body, streamed = kinds[name]
            await one_request(client, name, path, body_for(name, body, index), streamed)
        results: list[dict] = []
        next_index = 0

        async def client_loop():
            nonlocal next_index
            while next_index < requests:
                index = next_index
                next_index += 1
                name = names[index % len(names)]
                path, body, streamed = kinds[name]
                results.append(
                    await one_request(client, name, path, body_for(name, body, index), streamed)
                )

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        info = (await client.get("/v1/info")).json()
    return summarize(results, wall, requests, concurrency, tokens, info)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


def summarize(results, wall, requests, concurrency, tokens, info) -> dict:
    errors = [r for r in results if r["error"]]
    per_kind = {}
    for kind in dict.fromkeys(r["kind"] for r in results):
        mine = [r for r in results if r["kind"] == kind]
        per_kind[kind] = {
            "n": len(mine),
            "errors": sum(1 for r in mine if r["error"]),
            "latency_ms": percentiles([r["ms"] for r in mine]),
            "first_delta_ms": percentiles(
                [r["first_delta_ms"] for r in mine if r["first_delta_ms"] is not None]
            ),
        }
    return {
        "requests": requests,
        "concurrency": concurrency,
        "max_new_tokens": tokens,
        "answered": len(results) - len(errors),
        "errors": len(errors),
        "error_samples": [r["error"] for r in errors[:5]],
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "latency_ms": percentiles([r["ms"] for r in results]),
        "first_delta_ms": percentiles(
            [r["first_delta_ms"] for r in results if r["first_delta_ms"] is not None]
        ),
        "per_kind": per_kind,
        "server": info.get("session", {}),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_after": os.getloadavg(),
        },
    }


def table(result: dict) -> str:
    lines = [
        "| requests | n | errors | p50 ms | p95 ms | max ms | first delta p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, n, errors, latency, first):
        first_p50 = f"{first['p50']:.0f}" if first else "—"
        return f"| {name} | {n} | {errors} | {latency['p50']:.0f} | {latency['p95']:.0f} | {latency['max']:.0f} | {first_p50} |"

    for kind, stats in result["per_kind"].items():
        lines.append(
            row(kind, stats["n"], stats["errors"], stats["latency_ms"], stats["first_delta_ms"])
        )
    lines.append(
        row(
            "**all**",
            result["requests"],
            result["errors"],
            result["latency_ms"],
            result["first_delta_ms"],
        )
    )
    return "\n".join(lines)


def start_server(args, *options: str) -> tuple[subprocess.Popen, str]:
    """`rgpt-rt serve --bundle args.bundle` (plus `options`) on a free port: (process, URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "rgpt_rt.cli", "serve", "--bundle", args.bundle, "--port", str(port),
        "--device", args.device, "--log-level", "warning",
        "--queue-depth", str(max(args.concurrency, 8)),
        *options,
    ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    process = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"rgpt-rt serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("rgpt-rt serve did not come up within 180 s")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """Which server (--url, or --bundle to start one), and what every request asks for."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8080")
    where.add_argument("--bundle", help="start `rgpt-rt serve --bundle BUNDLE` on a free port")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="the server's --threads")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--json", type=Path, help="write the result here")


def parse_server_options(parser: argparse.ArgumentParser, argv: list[str] | None):
    args = parser.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("--url must be a loopback address: this benchmark stays on this machine")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parse_server_options(parser, argv)
    process = None
    url = args.url
    if args.bundle:
        process, url = start_server(args)
    try:
        result = asyncio.run(
            run_load(url, args.requests, args.concurrency, args.max_new_tokens, args.timeout)
        )
    finally:
        stop_server(process)
    server = result["server"]
    headline = (
        f"{result['requests']} requests, {result['concurrency']} at a time, "
        f"max_new_tokens {result['max_new_tokens']}: {result['errors']} errors, "
        f"{result['wall_s']:.1f} s, {result['requests_per_s']:.1f} requests/s; "
        f"model {server.get('model')} on {server.get('device')} ({server.get('vision_backend')})"
    )
    return report(result, headline, table(result), args.json)


def stop_server(process: subprocess.Popen | None) -> None:
    if process is not None:
        process.terminate()
        process.wait(timeout=30)


def report(result: dict, headline: str, tables: str, json_path: Path | None) -> int:
    """Print the headline and tables, write the JSON; the exit status: 1 if any errors."""
    print(headline)
    print(tables)
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
