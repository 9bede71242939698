"""Fixtures of the server tests: a Session over the tiny random-weight bundle, in-process
clients of apps over it, and a real `rgpt-rt serve` on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.runtime.session import Session
from rgpt_rt.serve import ServeLimits, create_app


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model runs fastest on one thread, and on a shared machine other jobs cannot
    stall it at OpenMP barriers (see tests/runtime/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    """A random-weight tiny RGPT that never ends an answer early: its end-of-sequence logit
    is 0 (a zero output row) while the largest of the other 767 random logits is above 0 in
    all but 2^-767 of cases, so every greedy answer runs to max_new_tokens and streams in
    many pieces. (An unaltered random model may stop after one word, for any seed.)"""
    from rgpt_rt.config import RGPTConfig
    from rgpt_rt.model import RGPT

    torch.manual_seed(5)
    model = RGPT(RGPTConfig.from_preset("tiny"))
    with torch.no_grad():
        model.llm.get_output_embeddings().weight[model.eos_token_id].zero_()
    folder = tmp_path_factory.mktemp("serve-src") / "ckpt"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def serve_bundle(serve_checkpoint, tmp_path_factory):
    """The INT4 (RTN) bundle of serve_checkpoint."""
    out = tmp_path_factory.mktemp("serve") / "tiny-rtn"
    build_bundle(
        BuildOptions(out=out, checkpoint=serve_checkpoint, quant="rtn", log=lambda _: None)
    )
    return out


@pytest.fixture(scope="session")
def serve_session(serve_bundle):
    return Session(serve_bundle, device="cpu")


@pytest.fixture(scope="module")
def client(serve_session):
    """An in-process client of the app with the default limits."""
    with TestClient(create_app(serve_session)) as test_client:
        yield test_client


@pytest.fixture
def make_client(serve_session):
    """make_client(limits=..., session=...): an in-process client of a fresh app."""
    opened = []

    def make(limits: ServeLimits | None = None, session=None, **options) -> TestClient:
        app = create_app(session or serve_session, limits or ServeLimits())
        test_client = TestClient(app, **options)
        test_client.__enter__()  # runs the app's lifespan: its model thread stops at exit
        opened.append(test_client)
        return test_client

    yield make
    for test_client in opened:
        test_client.__exit__(None, None, None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(serve_bundle, tmp_path_factory):
    """`rgpt-rt serve` as a user starts it, on 127.0.0.1 and a free port: its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [
        sys.executable, "-m", "rgpt_rt.cli", "serve", "--bundle", str(serve_bundle),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--threads", "1",
        "--log-level", "warning", "--queue-depth", "16",
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
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pytest_terminal_summary(terminalreporter):
    """The load test's latencies, where `make test` shows them."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "serve_load":
                terminalreporter.write_line(f"serve load test: {value}")
