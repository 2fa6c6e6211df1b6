"""Writing a validate result: JSON (checked against result.schema.json when jsonschema is installed) and the HTML
report."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("result.schema.json")


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def check_schema(result: dict) -> None:
    """Raise jsonschema.ValidationError when `result` does not follow the documented schema."""
    import jsonschema

    jsonschema.validate(result, load_schema())


def write_json(result: dict, path) -> Path:
    try:
        check_schema(result)
    except ImportError:  # jsonschema is a dev extra: without it the document is written unchecked
        pass
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def write_report(result: dict, path) -> Path:
    from .report_html import render_html

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(result))
    return path
