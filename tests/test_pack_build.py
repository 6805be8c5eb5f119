"""A neuron pack build stopped midway (SIGTERM, as a service manager or Ctrl-C would) leaves no folder behind."""

import signal
import subprocess
import sys
import time


def test_a_stopped_build_leaves_no_building_folder(tmp_path):
    out = tmp_path / "pack"
    building = tmp_path / "pack.building"
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", "profile", "--out", str(out), "--chat-answers", "0",
                             "--max-tokens", "400"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not building.exists():  # a liveness bound: the build starts by making this folder
            assert proc.poll() is None and time.monotonic() < deadline, "the build did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not building.exists() and not out.exists()
