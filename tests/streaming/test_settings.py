"""Settings come from CFNESA_* variables, are validated, and are all documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streaming.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"


def test_environment_overrides_defaults(monkeypatch):
    monkeypatch.setenv("CFNESA_MAX_BATCH_EVENTS", "7")
    monkeypatch.setenv("CFNESA_KAFKA_BOOTSTRAP", "k1:9092, k2:9092")
    monkeypatch.setenv("CFNESA_STATE_CACHE", "false")
    s = Settings()
    assert s.max_batch_events == 7
    assert s.bootstrap_servers() == ["k1:9092", "k2:9092"]
    assert s.state_cache is False


def test_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("CFNESA_MAX_BATCH_EVENTS", "0")
    with pytest.raises(ValidationError, match="max_batch_events"):
        Settings()


def test_every_setting_is_documented():
    text = DOC.read_text()
    missing = [name for name in Settings.model_fields if f"`{name}`" not in text]
    assert not missing, f"docs/pipeline.md does not document {missing}"
