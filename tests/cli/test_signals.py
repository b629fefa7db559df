"""``kill`` (SIGTERM) and a closed terminal (SIGHUP) clean up like Ctrl-C: nothing is left."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

#: Runs ``loratool merge`` with the first positioned write replaced by: tell the test (a marker
#: file), then wait. The signal arrives while the output is half written.
CHILD = """
import sys, time
from pathlib import Path
import lora_tools.io.safetensors as st

marker = Path(sys.argv[1])
real = st.SafetensorsWriter.write_at

def write_at(self, name, at, data):
    real(self, name, at, data)
    if not marker.exists():
        marker.write_text("writing")
        time.sleep(60)

st.SafetensorsWriter.write_at = write_at
sys.argv = ["loratool", "merge", *sys.argv[2:]]
from lora_tools.cli import main
main()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", 1)])
def test_a_signal_halfway_leaves_nothing(tmp_path: Path, signum: int) -> None:
    marker, out = tmp_path / "marker", tmp_path / "out"
    base, adapter = FIXTURES / "bases" / "tiny-llama-sharded", FIXTURES / "peft" / "llama-lora"
    args = [str(marker), str(base), str(adapter), "-o", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())  # half written
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    name = signal.Signals(signum).name
    assert err.strip().splitlines() == [
        f"loratool: error: stopped by {name}; no output was written"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]
