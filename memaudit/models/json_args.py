"""JSON-valued flags (--model-config, --factory-args): inline JSON text or the path of a JSON file, one object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from memaudit.errors import UserError


def read_json_arg(value: Optional[str], flag: str) -> Optional[dict]:
    """The JSON object `value` holds ('{...}' inline) or names (a file path); None if not given."""
    if value is None:
        return None
    text = value.strip()
    source = "its value"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{flag} {value}: not inline JSON ('{{...}}') and not a readable file "
                            f"({exc.strerror or exc})") from None
        source = str(path)
    return parse_json_object(text, f"{flag} ({source})")


def parse_json_object(text: str, what: str) -> dict:
    """json.loads(text), a UserError naming `what` unless it is a JSON object."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JSON object ({{...}}), not {type(data).__name__}")
    return data
