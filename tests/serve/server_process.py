"""A real `rgpt-rt serve` process on 127.0.0.1 and a free port, for the tests that need one."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (VmRSS) or at its peak so far (VmHWM), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) / 1024


@contextmanager
def serve_process(bundle: Path, log: Path, *options: str, launcher: Path | None = None):
    """`rgpt-rt serve` (or a test's `launcher` script taking the same options) on 127.0.0.1
    and a free port, until the block ends: its Server."""
    port = free_port()
    start = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "rgpt_rt.cli"]
    command = [
        *start, "serve", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--threads", "1", "--log-level", "warning", *options,
    ]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"rgpt-rt serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"rgpt-rt serve did not answer within 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(url, port, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
