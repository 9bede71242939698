"""A bounded soak of `rgpt-rt serve` over loopback: 8 clients for 10 minutes, valid and hostile
requests mixed; requests, errors by kind, p50/p99 latency, and the server's memory over time.

    python benchmarks/serve_soak.py --bundle build/bundles/tiny --json serve_soak.json
    python benchmarks/serve_soak.py --bundle build/bundles/tiny --minutes 2
    python benchmarks/serve_soak.py --url http://127.0.0.1:8080 --pid 1234  # a running server

Each client takes the next request of a fixed mix, again and again until the time is up: the
seven valid kinds of serve_load.py, twice each, and once each these, whose outcome is known:

    bad-image          a PNG that is not one                               400
    too-many-regions   17 boxes (--max-regions 16)                         422
    lone-surrogate     a question holding '\\ud800'                        4xx
    json-flood         300,000 boxes (4 MB, over --max-json-values)         413
    foreign-host       Host: attacker.example (DNS rebinding)              400
    slow-head          its headers a byte every 0.25 s                     408 / closed
    slow-body          its body a byte every 0.25 s                        408 / closed
    leaves             sends a describe of 64 tokens, closes at once       (nothing to read)

An outcome other than the expected one is an error, by kind: server_error (5xx),
wrong_status, transport (refused, reset, timed out), incomplete_stream, not_closed. Every
--sample-s seconds the server's resident memory (/proc/PID/status) and one /healthz time
are recorded. Prints markdown tables and writes JSON. Makes no request off this machine;
a server it starts gets 2 s head and body timeouts, so the slow clients end quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import httpx
from serve_load import (
    add_server_options,
    body_for,
    one_request,
    parse_server_options,
    percentiles,
    report,
    request_kinds,
    start_server,
    stop_server,
)

from rgpt_rt.serve.example import SHAPES, example_path

IMAGE = base64.b64encode(example_path().read_bytes()).decode()
CIRCLE = list(SHAPES["red circle"])
SERVER_OPTIONS = ("--header-timeout", "2", "--body-timeout", "2", "--idle-timeout", "5")
TRICKLE_S = 0.25


def hostile_kinds() -> dict[str, tuple[str, bytes, set[int]]]:
    """kind -> (Host header, raw JSON body, the statuses that are right) of the invalid requests
    sent as whole bodies."""

    def body(**fields) -> bytes:
        return json.dumps({"image": IMAGE, "max_new_tokens": 4, **fields}).encode()

    flood = b'{"image":"' + IMAGE.encode() + b'","boxes":[' + b"[10,20,60,80]," * 299_999
    return {
        "bad-image": ("localhost", json.dumps({"image": "iVBORw0KGgo=", "box": CIRCLE}).encode(), {400}),
        "too-many-regions": ("localhost", body(boxes=[CIRCLE] * 17), {422}),
        "lone-surrogate": ("localhost", body(box=CIRCLE, question="<region1> \ud800"), {400, 422}),
        "json-flood": ("localhost", flood + b"[10,20,60,80]]}", {413}),
        "foreign-host": ("attacker.example", body(box=CIRCLE), {400}),
    }  # fmt: skip


PATHS = {"lone-surrogate": "/v1/ask"}  # the rest are describes


async def send_hostile(client: httpx.AsyncClient, kind: str, host: str, body: bytes, ok: set[int]):
    started = time.perf_counter()
    error = None
    try:
        response = await client.post(
            PATHS.get(kind, "/v1/describe"),
            content=body,
            headers={"host": host, "content-type": "application/json"},
        )
        if response.status_code not in ok:
            error = f"{response.status_code}: {response.text[:200]}"
    except httpx.HTTPError as failure:
        error = f"{type(failure).__name__}: {failure}"
    return result(kind, started, error)


async def send_raw(port: int, kind: str, timeout: float) -> dict:
    """slow-head, slow-body and leaves, over a socket of their own."""
    started = time.perf_counter()
    body = json.dumps({"image": IMAGE, "box": CIRCLE, "max_new_tokens": 64}).encode()
    head = (
        "POST /v1/describe HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as failure:
        return result(kind, started, f"{type(failure).__name__}: {failure}")
    try:
        if kind == "leaves":
            writer.write(head + body)
            await writer.drain()
            return result(kind, started, None)
        trickle = head if kind == "slow-head" else body
        if kind == "slow-body":
            writer.write(head)
        received = await trickle_until_closed(reader, writer, trickle, timeout)
        if received is None:
            return result(kind, started, f"not_closed: still open after {timeout:g} s")
        if received and not received.startswith(b"HTTP/1.1 408"):
            return result(kind, started, f"{received[9:12].decode()}: {received[:200]!r}")
        return result(kind, started, None)
    finally:
        writer.close()


async def trickle_until_closed(reader, writer, data: bytes, timeout: float) -> bytes | None:
    """Send `data` a byte per TRICKLE_S until the server closes the connection: what it sent
    (b"" for a close without an answer), or None if it was still open after `timeout`."""
    deadline = time.monotonic() + timeout
    received = b""
    for byte in (data[i : i + 1] for i in range(len(data))):
        if time.monotonic() > deadline:
            return None
        try:
            writer.write(byte)
            await writer.drain()
            chunk = await asyncio.wait_for(reader.read(65536), TRICKLE_S)
        except TimeoutError:
            continue
        except OSError:  # reset as a byte arrived after the close
            return received
        if not chunk:
            return received
        received += chunk
    try:  # all of it sent: the answer, then the close
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            received += chunk
    except (TimeoutError, OSError):
        pass
    return received


def result(kind: str, started: float, error: str | None) -> dict:
    return {"kind": kind, "ms": (time.perf_counter() - started) * 1000, "error": error}


def error_kind(error: str) -> str:
    if error.startswith("not_closed"):
        return "not_closed"
    if error.startswith("the stream did not end"):
        return "incomplete_stream"
    if error[:3].isdigit():
        return "server_error" if error.startswith("5") else "wrong_status"
    return "transport"


async def sample_server(url: str, pid: int | None, every_s: float, samples: list, stop):
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.monotonic()
        while not stop.is_set():
            begun = time.perf_counter()
            try:
                ok = (await client.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append(
                {
                    "t_s": time.monotonic() - started,
                    "rss_mb": rss_mb(pid),
                    "healthz_ms": (time.perf_counter() - begun) * 1000 if ok else None,
                }
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


async def soak(url: str, pid: int | None, args) -> dict:
    valid = request_kinds(args.max_new_tokens)
    hostile = hostile_kinds()
    mix = [*valid, *valid, *hostile, "slow-head", "slow-body", "leaves"]
    port = int(url.rsplit(":", 1)[1])
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    samples: list[dict] = []
    results: list[dict] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        for index, name in enumerate(valid):  # warm-up, not counted
            path, body, streamed = valid[name]
            await one_request(client, name, path, body_for(name, body, index), streamed)
        sampler = asyncio.create_task(sample_server(url, pid, args.sample_s, samples, stop))
        end = time.monotonic() + args.minutes * 60
        next_index = 0

        async def client_loop():
            nonlocal next_index
            while time.monotonic() < end:
                index = next_index
                next_index += 1
                kind = mix[index % len(mix)]
                if kind in valid:
                    path, body, streamed = valid[kind]
                    body = body_for(kind, body, index)
                    results.append(await one_request(client, kind, path, body, streamed))
                elif kind in hostile:
                    results.append(await send_hostile(client, kind, *hostile[kind]))
                else:
                    results.append(await send_raw(port, kind, args.timeout))

        started = time.monotonic()
        await asyncio.gather(*(client_loop() for _ in range(args.clients)))
        wall = time.monotonic() - started
        stop.set()
        await sampler
        info = (await client.get("/v1/info")).json()
    return summarize(results, samples, wall, valid, args, info)


def summarize(results, samples, wall, valid, args, info) -> dict:
    for item in results:
        item["error_kind"] = error_kind(item["error"]) if item["error"] else None
    per_kind = {}
    for kind in dict.fromkeys(r["kind"] for r in results):
        mine = [r for r in results if r["kind"] == kind]
        per_kind[kind] = {
            "n": len(mine),
            "valid": kind in valid,
            "errors": sum(1 for r in mine if r["error"]),
            "latency_ms": percentiles([r["ms"] for r in mine]),
        }
    errors = [r for r in results if r["error"]]
    by_kind: dict[str, int] = {}
    for item in errors:
        by_kind[item["error_kind"]] = by_kind.get(item["error_kind"], 0) + 1
    rss = [s["rss_mb"] for s in samples if s["rss_mb"] is not None]
    health = [s["healthz_ms"] for s in samples if s["healthz_ms"] is not None]
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "max_new_tokens": args.max_new_tokens,
        "wall_s": wall,
        "requests": len(results),
        "valid_requests": sum(1 for r in results if r["kind"] in valid),
        "errors": len(errors),
        "errors_by_kind": by_kind,
        "error_samples": [f"{r['kind']}: {r['error']}" for r in errors[:10]],
        "latency_ms": {
            "valid": percentiles([r["ms"] for r in results if r["kind"] in valid]),
            "invalid": percentiles([r["ms"] for r in results if r["kind"] not in valid]),
        },
        "per_kind": per_kind,
        "rss_mb": {"first": rss[0], "last": rss[-1], "max": max(rss)} if rss else {},
        "healthz_ms": percentiles(health),
        "samples": samples,
        "server": info.get("session", {}),
        "limits": info.get("limits", {}),
    }


def tables(result: dict) -> str:
    lines = ["| requests | n | errors | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for kind, stats in result["per_kind"].items():
        latency = stats["latency_ms"]
        name = kind if stats["valid"] else f"{kind} (invalid)"
        lines.append(
            f"| {name} | {stats['n']} | {stats['errors']} | {latency['p50']:.0f} | "
            f"{latency['p99']:.0f} | {latency['max']:.0f} |"
        )
    for group, latency in result["latency_ms"].items():
        if latency:
            lines.append(
                f"| **all {group}** | | | {latency['p50']:.0f} | {latency['p99']:.0f} | "
                f"{latency['max']:.0f} |"
            )
    lines += ["", "| minute | server RSS MB (last) | /healthz ms (max) |", "|---|---|---|"]
    minutes: dict[int, list[dict]] = {}
    last = max(math.ceil(result["minutes"]) - 1, 0)  # the closing sample falls in the last minute
    for sample in result["samples"]:
        minutes.setdefault(min(int(sample["t_s"] // 60), last), []).append(sample)
    for minute, samples in minutes.items():
        rss = samples[-1]["rss_mb"]
        health = [s["healthz_ms"] for s in samples if s["healthz_ms"] is not None]
        lines.append(
            f"| {minute + 1} | {'—' if rss is None else f'{rss:.0f}'} | "
            f"{f'{max(health):.0f}' if health else 'no answer'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    parser.add_argument("--pid", type=int, help="with --url: the server's process, for its RSS")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=5.0, help="RSS and /healthz every S s")
    args = parse_server_options(parser, argv)
    args.concurrency = args.clients  # the queue depth serve_load.start_server gives a server
    process, url, pid = None, args.url, args.pid
    if args.bundle:
        process, url = start_server(args, *SERVER_OPTIONS)
        pid = process.pid
    try:
        result = asyncio.run(soak(url, pid, args))
    finally:
        stop_server(process)
    server, rss = result["server"], result["rss_mb"]
    memory = f"RSS {rss['first']:.0f} -> {rss['last']:.0f} MB (max {rss['max']:.0f})" if rss else ""
    headline = (
        f"{result['minutes']:g} min, {result['clients']} clients: {result['requests']} requests "
        f"({result['valid_requests']} valid), {result['errors']} errors"
        f"{' ' + str(result['errors_by_kind']) if result['errors'] else ''}; {memory}; /healthz p99 "
        f"{result['healthz_ms'].get('p99', float('nan')):.0f} ms; model {server.get('model')} on "
        f"{server.get('device')} ({server.get('vision_backend')})"
    )
    return report(result, headline, tables(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
