"""`videonsa analyze`: registration, torch-free help, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from analysis_helpers import SMALL_FRAMES

from videonsa.cli import build_parser, main

HEAVY_MODULES = ("torch", "transformers", "av", "triton")
PROBE = """
import json, sys
from videonsa.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}), file=sys.stderr)
"""


def test_gates_and_sinks_are_registered_with_the_shared_options():
    parser = build_parser()
    for analysis in ("gates", "sinks"):
        args = parser.parse_args(["analyze", analysis, "--out", "o", "--model", "m", "--video", "a.mp4", "b.mp4"])
        assert args.analysis == analysis and args.video == ["a.mp4", "b.mp4"]
        assert (args.attention, args.device, args.dtype, args.fresh_gates) == ("auto", "auto", "auto", False)
    assert parser.parse_args(["analyze", "sinks", "--out", "o", "--model", "m", "--video", "v"]).threshold == 0.1


@pytest.mark.parametrize("argv", [("analyze", "--help"), ("analyze", "gates", "--help"), ("analyze", "sinks", "-h")])
def test_help_loads_no_heavy_library(argv):
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY_MODULES), *argv],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}
    assert "--out" in result.stdout or argv == ("analyze", "--help")


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_no_analysis_chosen(capsys):
    assert "choose an analysis" in one_line_error(capsys, ["analyze"])


@pytest.mark.parametrize("analysis", ["gates", "sinks"])
def test_bad_inputs_are_one_line_errors_naming_the_culprit(tmp_path, capsys, analysis_inputs, analysis):
    model = str(analysis_inputs.ours)
    video = str(analysis_inputs.short_video)
    out = tmp_path / "out"
    base = ["analyze", analysis, "--out", str(out)]
    missing = str(tmp_path / "missing.mp4")
    assert missing in one_line_error(capsys, [*base, "--model", model, "--video", video, missing, *SMALL_FRAMES])
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    assert "notes.mp4" in one_line_error(capsys, [*base, "--model", model, "--video", str(not_a_video),
                                                   *SMALL_FRAMES])
    no_model = str(tmp_path / "no-model")
    assert "no-model" in one_line_error(capsys, [*base, "--model", no_model, "--video", video, *SMALL_FRAMES])
    assert "--fps" in one_line_error(capsys, [*base, "--model", model, "--video", video, "--device", "cpu",
                                              "--fps", "-1"])
    assert "nonsense" in one_line_error(capsys, [*base, "--model", model, "--video", video, "--device", "nonsense"])
    assert "--budget=20 is too small" in one_line_error(capsys, [*base, "--model", model, "--video", video,
                                                                 *SMALL_FRAMES, "--budget", "20"])
    assert not out.exists()  # no mistake leaves an empty run folder behind
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert "a-file" in one_line_error(capsys, ["analyze", analysis, "--out", str(a_file), "--model", model,
                                               "--video", video, *SMALL_FRAMES])


def test_sinks_threshold_must_be_a_share(tmp_path, capsys, analysis_inputs):
    err = one_line_error(capsys, ["analyze", "sinks", "--out", str(tmp_path / "o"), "--model",
                                  str(analysis_inputs.ours), "--video", str(analysis_inputs.short_video),
                                  "--threshold", "1.5", *SMALL_FRAMES])
    assert "--threshold" in err


def test_fresh_gates_lets_a_partly_gated_checkpoint_be_analysed(tmp_path, capsys, analysis_inputs):
    from videonsa import testing

    folder = tmp_path / "partly-gated"
    shutil.copytree(analysis_inputs.ours, folder)
    testing.drop_layer_gates(folder, layer=0)
    argv = ["analyze", "gates", "--out", str(tmp_path / "out"), "--model", str(folder),
            "--video", str(analysis_inputs.short_video), *SMALL_FRAMES]
    err = one_line_error(capsys, argv)
    assert "missing for layer(s) 0 of 2" in err and "--fresh-gates" in err
    assert not (tmp_path / "out").exists()  # the refused run leaves no empty run folder behind
    assert main([*argv, "--fresh-gates"]) == 0
    assert json.loads((tmp_path / "out" / "gates.json").read_text())["layers"] == 2
