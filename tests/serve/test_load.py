"""A bounded load on `rgpt-rt serve` over loopback: 200 requests of every kind, 8 at a time,
by benchmarks/serve_load.py as a user runs it. All answered; p50/p95 shown in the summary.
And a short soak by benchmarks/serve_soak.py: valid and hostile requests, no errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # 200 requests through HTTP: ~6 s on 2 cores
def test_200_requests_8_at_a_time_are_all_answered(live_server, tmp_path, record_property):
    out = tmp_path / "serve_load.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--url", live_server,
        "--requests", "200", "--concurrency", "8", "--max-new-tokens", "8", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    load = json.loads(out.read_text())
    assert load["errors"] == 0 and load["answered"] == 200, load["error_samples"]
    assert sum(kind["n"] for kind in load["per_kind"].values()) == 200
    assert len(load["per_kind"]) == 7, "every kind of request was sent"
    latency = load["latency_ms"]
    record_property(
        "serve_load",
        f"200 requests, 8 at a time, 0 errors: p50 {latency['p50']:.0f} ms, "
        f"p95 {latency['p95']:.0f} ms, {load['requests_per_s']:.1f} requests/s "
        f"(load average after: {load['machine']['load_average_after'][0]:.1f})",
    )


@pytest.mark.slow
def test_a_short_soak_of_valid_and_hostile_requests_has_no_errors(serve_bundle, tmp_path):
    """benchmarks/serve_soak.py as a user runs it, for 6 s instead of 10 minutes."""
    out = tmp_path / "serve_soak.json"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "serve_soak.py"), "--bundle", str(serve_bundle),
        "--threads", "1", "--minutes", "0.1", "--clients", "4", "--max-new-tokens", "4",
        "--sample-s", "1", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    soak = json.loads(out.read_text())
    assert soak["errors"] == 0, soak["error_samples"]
    assert soak["valid_requests"] > 0 and soak["requests"] > soak["valid_requests"]
    assert soak["rss_mb"]["max"] > 0 and soak["samples"]
