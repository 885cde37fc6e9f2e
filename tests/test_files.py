"""`videonsa.files`, the atomic-write helpers: files get the permissions a plain open would give, and a writer
killed between writing and renaming leaves nothing behind once the next write to the same file has run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from videonsa.files import atomic_write, atomic_write_json, atomic_write_text, jsonl_lines, staging_folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _replace_with_private_file(temporary: str) -> None:
    """Write as safetensors' save_file does: a new 0600 file renamed over the given path."""
    private = temporary + ".own"
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(descriptor, b"x")
    os.close(descriptor)
    os.replace(private, temporary)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask_like_a_plain_open(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        atomic_write_json(tmp_path / "atomic.json", {"a": 1})
        atomic_write(tmp_path / "atomic.bin", lambda temporary: Path(temporary).write_bytes(b"x"))
        atomic_write(tmp_path / "replaced.bin", _replace_with_private_file)
    finally:
        os.umask(previous)
    expected = _mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    for name in ("atomic.txt", "atomic.json", "atomic.bin", "replaced.bin"):
        assert _mode(tmp_path / name) == expected, name


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_kill_before_the_rename_leaves_no_temporary_after_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "manifest.jsonl"
    target.write_text("old\n")
    # A writer that gets SIGKILL after writing its temporary file, before the rename.
    script = textwrap.dedent(
        f"""
        import os, signal
        from videonsa import files
        os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        files.atomic_write_text({str(target)!r}, "new\\n")
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    leftovers = _leftovers(tmp_path)
    assert len(leftovers) == 1 and target.read_text() == "old\n"  # the kill did leave one behind
    # Its writer is dead (no lock held); make it older than a writer that is just starting.
    past = time.time() - 60
    os.utime(tmp_path / leftovers[0], (past, past))
    atomic_write_text(target, "newer\n")
    assert target.read_text() == "newer\n"
    assert _leftovers(tmp_path) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    """Another process still writing the same file keeps its temporary file (it holds a lock on it)."""
    target = tmp_path / "report.json"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from videonsa import files
        def slow(temporary):
            open(temporary, "w").write("slow")
            past = time.time() - 60
            os.utime(temporary, (past, past))
            print("writing", flush=True)
            sys.stdin.readline()
        files.atomic_write({str(target)!r}, slow)
        """
    )
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        atomic_write_text(target, "fast")
        assert len(_leftovers(tmp_path)) == 1  # the slow writer's temporary survives
        writer.stdin.write("\n")
        writer.stdin.flush()
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert target.read_text() == "slow" and _leftovers(tmp_path) == []


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_staging_folder_mode_cleanup_and_removal_on_error(tmp_path: Path) -> None:
    destination = tmp_path / "converted"
    # A conversion killed while filling its staging folder (simulated in a subprocess killed by SIGKILL).
    script = textwrap.dedent(
        f"""
        import os, signal
        from videonsa.files import staging_folder
        with staging_folder({str(destination)!r}) as staging:
            (staging / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    (abandoned,) = [p for p in tmp_path.iterdir() if p.name.startswith(".converted.partial-")]
    past = time.time() - 60
    os.utime(abandoned, (past, past))

    previous = os.umask(0o022)
    try:
        with pytest.raises(RuntimeError, match="failed"), staging_folder(destination) as staging:
            assert not abandoned.exists()  # removed when the next conversion started
            assert _mode(staging) == 0o755
            raise RuntimeError("failed")
    finally:
        os.umask(previous)
    assert list(tmp_path.iterdir()) == []
    with staging_folder(destination) as staging:
        (staging / "a").write_text("x")
        os.replace(staging, destination)
    assert [p.name for p in tmp_path.iterdir()] == ["converted"] and (destination / "a").read_text() == "x"


def test_the_model_package_writes_files_without_the_training_package() -> None:
    """`videonsa.models` (checkpoint conversion included) stands below training: it imports nothing of it."""
    script = (
        "import sys, videonsa.models.convert\n"
        "print(sorted(m for m in sys.modules if m.startswith(('videonsa.training', 'videonsa.evaluation'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_json_lines_split_at_newlines_only():
    # json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 raw inside strings: they do not end a line.
    text = json.dumps({"q": "a\u2028b\x85c"}, ensure_ascii=False) + "\n" + json.dumps({"q": "d"}) + "\n"
    assert [json.loads(line) for line in jsonl_lines(text) if line] == [{"q": "a\u2028b\x85c"}, {"q": "d"}]
