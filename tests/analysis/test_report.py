"""report.html: every analysis of a run folder, in order, with its summary, JSON link and plots."""

from __future__ import annotations

import json

from videonsa.analysis.common import new_figure, save_figure, write_json
from videonsa.analysis.report import analyses_in, write_report


def plot(out, name):
    figure = new_figure(2, 2)
    figure.add_subplot().plot([0, 1], [1, 0])
    return save_figure(figure, out, name)


def test_report_gathers_every_analysis(tmp_path):
    write_json(tmp_path, "sinks", {"summary": {"cmp": {"sink_ratio": 0.25, "note": "<b>"}}, "big": list(range(50))})
    write_json(tmp_path, "gates", {"layers": 2, "mean": {"cmp": [[0.5]]}, "nan": float("nan")})
    plot(tmp_path, "gates_heatmaps.png")
    plot(tmp_path, "sinks_ratio.png")
    plot(tmp_path, "latency_branches.png")  # a plot without a JSON file yet
    (tmp_path / "context.json").write_text("{broken")
    assert analyses_in(tmp_path) == ["gates", "sinks", "context", "latency"]
    path = write_report(tmp_path)
    page = path.read_text()
    positions = [page.index(f'id="{name}"') for name in ("gates", "sinks", "context", "latency")]
    assert positions == sorted(positions)
    assert 'src="gates_heatmaps.png"' in page and 'src="latency_branches.png"' in page
    assert "cmp.sink_ratio" in page and "0.25" in page
    assert "&lt;b&gt;" in page and "<b>" not in page  # JSON text is escaped
    assert "context.json cannot be read" in page
    assert json.loads((tmp_path / "gates.json").read_text())["nan"] is None  # strict JSON
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_an_empty_folder_gets_a_page_saying_so(tmp_path):
    assert "No analysis" in write_report(tmp_path).read_text()
