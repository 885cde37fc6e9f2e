"""A named pipe (or any file that is not a regular file) given as a video is refused at once: reading it would
block until something writes to the pipe, possibly forever."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from videonsa.errors import UserError
from videonsa.video import probe_video

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX named pipes")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    # In a subprocess with a timeout: on failure the test fails instead of hanging the suite.
    script = textwrap.dedent(
        f"""
        from videonsa.errors import UserError
        from videonsa.video import probe_video
        try:
            probe_video({str(fifo)!r})
        except UserError as error:
            print(error)
        """
    )
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("probing a FIFO blocked")
    expected = f"{fifo}: is a named pipe (FIFO), not a file; pass a video file or a folder of frames"
    assert result.stdout.strip() == expected, result.stderr


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.mp4"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(UserError, match=r"s\.mp4: is a socket, not a file"):
            probe_video(path)


def test_a_character_device_is_refused():
    with pytest.raises(UserError, match=r"/dev/zero: is a device, not a file"):
        probe_video("/dev/zero")
