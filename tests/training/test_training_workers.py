"""Probing workers of `data prepare` die with their parent, however the parent ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

# A prober that records its worker's pid and then hangs, so workers are busy when the parent is killed.
SLOW_PROBER = """
import os, time
from pathlib import Path

def probe(media, is_video):
    Path(os.environ["PID_FOLDER"], str(os.getpid())).touch()
    time.sleep(120)
"""

PARENT = """
import sys
from slow_prober import probe
from videonsa.training.prepare import prepare_manifest
prepare_manifest(sys.argv[1], sys.argv[2], workers=2, prober=probe, progress=False)
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting to be reaped counts as ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("kill_signal", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_when_the_parent_is_killed(tmp_path, kill_signal):
    (tmp_path / "slow_prober.py").write_text(textwrap.dedent(SLOW_PROBER))
    pids = tmp_path / "pids"
    pids.mkdir()
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps({**record, "id": str(index), "images": [f"f{index}.png"]}) for index in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PID_FOLDER": str(pids), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "a.jsonl"), str(tmp_path / "m.jsonl")],
                              env=env, cwd=tmp_path)
    try:
        assert wait_for(lambda: len(list(pids.iterdir())) == 2, 60), "the workers did not start"
        workers = [int(path.name) for path in pids.iterdir()]
        parent.send_signal(kill_signal)
        parent.wait(10)
        assert wait_for(lambda: not any(map(running, workers)), 10), "workers outlived their parent"
    finally:
        parent.kill()
        for path in pids.iterdir():
            if running(int(path.name)):
                os.kill(int(path.name), signal.SIGKILL)
