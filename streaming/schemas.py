"""JSON Schema files for the topics, generated from the models in streaming.events.

The files under docs/schemas/ are for people and for producers in other languages;
the models stay the source of truth, and a test fails when the files are stale::

    python -m streaming.schemas           # regenerate docs/schemas/
    python -m streaming.schemas --check   # exit 1 if a file is missing or differs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter

from streaming.events import DeadLetter, InputEvent, OutputEvent, TextInput

__all__ = ["DEFAULT_FOLDER", "check_schemas", "render_schemas", "write_schemas"]

DEFAULT_FOLDER = Path("docs/schemas")

# file name -> (title, the type, the mode: what producers send, or what we write)
_TOPICS: dict[str, tuple[str, Any, Literal["validation", "serialization"]]] = {
    "utterance-features.v1.schema.json": (
        "utterance-features, version 1",
        InputEvent,
        "validation",
    ),
    "emotion-events.schema.json": ("emotion-events", OutputEvent, "serialization"),
    "utterance-features.dlq.schema.json": ("utterance-features.dlq", DeadLetter, "serialization"),
    "utterance-text.v1.schema.json": ("utterance-text, version 1", TextInput, "validation"),
    "utterance-text.dlq.schema.json": ("utterance-text.dlq", DeadLetter, "serialization"),
}


def render_schemas() -> dict[str, str]:
    """Every schema file's name and its exact text (sorted keys, indent 2, final newline)."""
    rendered: dict[str, str] = {}
    for name, (title, kind, mode) in _TOPICS.items():
        schema = TypeAdapter(kind).json_schema(mode=mode)
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
        schema["title"] = title
        rendered[name] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return rendered


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema file into ``folder`` (created if needed); return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_schemas().items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def check_schemas(folder: Path) -> list[str]:
    """The names of schema files in ``folder`` that are missing or differ from the models."""
    stale = []
    for name, text in render_schemas().items():
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the schema files, or with --check report stale ones."""
    parser = argparse.ArgumentParser(prog="python -m streaming.schemas", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER)
    args = parser.parse_args(argv)
    if args.check:
        stale = check_schemas(args.folder)
        for name in stale:
            print(f"stale: {args.folder / name} (run python -m streaming.schemas)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_schemas(args.folder):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
