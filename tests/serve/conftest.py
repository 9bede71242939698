"""Fixtures of the server tests: a Session over the tiny random-weight bundle, in-process
clients of apps over it, and a real `rgpt-rt serve` on a free loopback port."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from server_process import serve_process

from rgpt_rt.export.build import BuildOptions, build_bundle
from rgpt_rt.runtime.session import Session
from rgpt_rt.serve import ServeLimits, create_app

LOCAL = "http://localhost"  # the Host the server answers to by default


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
    with TestClient(create_app(serve_session), base_url=LOCAL) as test_client:
        yield test_client


@pytest.fixture
def make_client(serve_session):
    """make_client(limits=..., session=...): an in-process client of a fresh app."""
    opened = []

    def make(limits: ServeLimits | None = None, session=None, **options) -> TestClient:
        app = create_app(session or serve_session, limits or ServeLimits())
        test_client = TestClient(app, **{"base_url": LOCAL, **options})
        test_client.__enter__()  # runs the app's lifespan: its model thread stops at exit
        opened.append(test_client)
        return test_client

    yield make
    for test_client in opened:
        test_client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def live_server(serve_bundle, tmp_path_factory):
    """`rgpt-rt serve` as a user starts it, on 127.0.0.1 and a free port: its base URL."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve_process(serve_bundle, log, "--queue-depth", "16") as server:
        yield server.url


def pytest_terminal_summary(terminalreporter):
    """The load test's latencies, where `make test` shows them."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "serve_load":
                terminalreporter.write_line(f"serve load test: {value}")
