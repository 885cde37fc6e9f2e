"""The prologue and epilogue the prefill analyses share (`start_prefill_analysis`, `PrefillAnalysis`)."""

from __future__ import annotations

import json

import pytest
from analysis_helpers import SMALL_FRAMES

from videonsa.analysis.common import start_prefill_analysis
from videonsa.cli import build_parser
from videonsa.errors import UserError


def _args(out, model, *videos):
    return build_parser().parse_args(["analyze", "gates", "--out", str(out), "--model", str(model),
                                      "--video", *map(str, videos), *SMALL_FRAMES])


def test_every_video_is_checked_before_the_folder_or_the_weights(tmp_path, analysis_inputs, monkeypatch):
    from videonsa.analysis.common import AnalysisModel

    monkeypatch.setattr(AnalysisModel, "load", lambda self: pytest.fail("weights loaded before the videos passed"))
    out = tmp_path / "out"
    args = _args(out, analysis_inputs.ours, analysis_inputs.short_video, tmp_path / "missing.mp4")
    with pytest.raises(UserError, match="missing.mp4: no such file"):
        start_prefill_analysis(args, "gates")
    assert not out.exists()


def test_one_hooked_prefill_per_video_then_the_files(tmp_path, analysis_inputs, capsys):
    out = tmp_path / "out"
    videos = (analysis_inputs.short_video, analysis_inputs.video)
    analysis = start_prefill_analysis(_args(out, analysis_inputs.ours, *videos), "gates")
    assert out.is_dir() and analysis.model is not None and analysis.out == out
    layers = analysis.model.config.text_config.num_hidden_layers
    seen, frames = [], []
    for prepared in analysis.videos():
        analysis.prefill(prepared, lambda call, path=prepared.path: seen.append((path, call.layer)))
        frames.append(prepared.frames)
    assert seen == [(str(video), layer) for video in videos for layer in range(layers)]
    assert frames == [8, 16]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1] for line in lines] == [str(video) for video in videos]

    plotted = []
    report = analysis.write({"analysis": "gates"}, lambda result, folder: plotted.append((result, folder)))
    written = json.loads((out / "gates.json").read_text())
    assert written["analysis"] == "gates" and written["model"] == analysis.opened.files.name
    assert plotted[0][1] == out and plotted[0][0]["attention"] == "nsa"
    assert report == out / "report.html" and report.is_file()
