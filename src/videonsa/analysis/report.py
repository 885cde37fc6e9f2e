"""DIR/report.html: one page gathering every analysis of a run folder (docs/analysis.md).

For each subcommand that wrote `DIR/<sub>.json` (gates, sinks, budget, context, latency first, in that order, then
any other), the page shows its summary (the JSON's "summary" object, else its top-level numbers, flattened into
a table), a link to the JSON, and its plots `DIR/<sub>_*.png`. Plots are linked by relative path, so the folder
can be moved or served as it is. Every subcommand regenerates the page after writing its files; the page is
written atomically.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from videonsa.analysis.common import ANALYSES

REPORT_FILE = "report.html"
# Rows of one summary table: a page for people, not a dump of the JSON (which is linked).
_MAX_ROWS = 80
_MAX_LIST = 8

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
td { border: 1px solid #ddd; padding: 2px 8px; } td.key { color: #555; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; } .note { color: #a40; }
"""


def analyses_in(out: str | Path) -> list[str]:
    """The subcommands with files in the run folder: known ones in `ANALYSES` order, then others by name."""
    folder = Path(out)
    found = {path.stem for path in folder.glob("*.json") if not path.name.startswith(".")}
    found |= {path.name.split("_", 1)[0] for path in folder.glob("*_*.png") if not path.name.startswith(".")}
    return [sub for sub in ANALYSES if sub in found] + sorted(found - set(ANALYSES))


def write_report(out: str | Path) -> Path:
    """Write DIR/report.html from the JSON files and PNGs of the run folder; returns its path."""
    from videonsa.files import atomic_write_text

    folder = Path(out)
    sections = [_section(folder, sub) for sub in analyses_in(folder)]
    body = "\n".join(sections) if sections else "<p>No analysis has written results here yet.</p>"
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>videonsa analyze: {html.escape(folder.name)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>videonsa analyze: {html.escape(folder.resolve().name)}</h1>\n{body}\n</body></html>\n"
    )
    path = folder / REPORT_FILE
    atomic_write_text(path, page)
    return path


def _section(folder: Path, sub: str) -> str:
    parts = [f"<h2 id=\"{html.escape(sub)}\">{html.escape(sub)}</h2>"]
    json_file = folder / f"{sub}.json"
    if json_file.is_file():
        try:
            data = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            parts.append(f"<p class=\"note\">{html.escape(json_file.name)} cannot be read: "
                         f"{html.escape(str(error))}</p>")
        else:
            parts.append(_summary_table(data))
        parts.append(f"<p>All numbers: <a href=\"{html.escape(json_file.name)}\">{html.escape(json_file.name)}</a></p>")
    for image in sorted(folder.glob(f"{sub}_*.png")):
        name = html.escape(image.name)
        parts.append(f"<figure><a href=\"{name}\"><img src=\"{name}\" alt=\"{name}\"></a>"
                     f"<figcaption>{name}</figcaption></figure>")
    return "\n".join(parts)


def _summary_table(data: Any) -> str:
    """The JSON's "summary" object (else its top level), flattened to key / value rows."""
    source = data.get("summary", data) if isinstance(data, dict) else data
    rows = list(_flatten(source, ""))
    if not rows:
        return ""
    shown = rows[:_MAX_ROWS]
    lines = [f"<tr><td class=\"key\">{html.escape(key)}</td><td>{html.escape(value)}</td></tr>" for key, value in shown]
    if len(rows) > len(shown):
        lines.append(f"<tr><td colspan=\"2\">... {len(rows) - len(shown)} more in the JSON file</td></tr>")
    return "<table>" + "".join(lines) + "</table>"


def _flatten(value: Any, prefix: str):
    """(dotted key, text) pairs of the scalars in `value`; long lists are summarised by their length."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):
        if len(value) <= _MAX_LIST and all(not isinstance(item, (dict, list)) for item in value):
            yield prefix, ", ".join(_text(item) for item in value)
        else:
            yield prefix, f"[{len(value)} entries]"
    else:
        yield prefix or "value", _text(value)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)
