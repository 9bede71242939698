"""export/build_engine.py run as a user runs it (a subprocess), for the tests that need that."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_build_script(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """export/build_engine.py as a user runs it."""
    script = ROOT / "export" / "build_engine.py"
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600, **kwargs
    )
