"""The JSON Schema files under docs/schemas/ match the models."""

from __future__ import annotations

import json
from pathlib import Path

from streaming.schemas import check_schemas, main, write_schemas

ROOT = Path(__file__).resolve().parents[2]
FOLDER = ROOT / "docs" / "schemas"


def test_docs_schemas_are_current() -> None:
    assert check_schemas(FOLDER) == [], "run: python -m streaming.schemas"


def test_output_schema_is_discriminated_by_type() -> None:
    schema = json.loads((FOLDER / "emotion-events.schema.json").read_text())
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(schema["discriminator"]["mapping"]) == {"emotion", "alert", "summary"}
    assert "from" in schema["$defs"]["AlertEvent"]["properties"]


def test_input_schema_requires_the_discriminator() -> None:
    schema = json.loads((FOLDER / "utterance-features.v1.schema.json").read_text())
    assert set(schema["discriminator"]["mapping"]) == {"utterance", "end"}
    for name in ("UtteranceEvent", "EndEvent"):
        assert {"type", "schema_version", "conversation_id", "seq"} <= set(
            schema["$defs"][name]["required"]
        )


def test_write_is_deterministic_and_check_finds_stale_files(tmp_path: Path) -> None:
    paths = write_schemas(tmp_path)
    first = [p.read_bytes() for p in paths]
    assert [p.read_bytes() for p in write_schemas(tmp_path)] == first
    assert all(text.endswith(b"}\n") for text in first)
    assert check_schemas(tmp_path) == []
    assert main(["--check", str(tmp_path)]) == 0

    paths[0].write_text("{}\n")
    paths[1].unlink()
    assert check_schemas(tmp_path) == [paths[0].name, paths[1].name]
    assert main(["--check", str(tmp_path)]) == 1
