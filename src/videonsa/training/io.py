"""Small file helpers: writes that never leave a half-written file behind, and config file loading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from videonsa.errors import UserError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, value: Any) -> None:
    """Write `value` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file holding a mapping; any problem is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            value = load_yaml(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"config file {path} is not valid YAML{where}") from None
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"config file {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(value).__name__}")
    return value


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that ``1e-6`` is a number (YAML 1.1 reads it as a string without a dot)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    # Plain integers keep resolving to int: the int resolver was registered first and is tried first.
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
