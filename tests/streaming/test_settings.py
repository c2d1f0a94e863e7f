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


# ---------------------------------------------------------------- secure connections


def test_security_settings_from_the_environment(monkeypatch, tmp_path: Path):
    ca = tmp_path / "ca.pem"
    monkeypatch.setenv("CFNESA_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CFNESA_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CFNESA_KAFKA_SASL_USERNAME", "svc-cfnesa")
    monkeypatch.setenv("CFNESA_KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("CFNESA_KAFKA_SSL_CAFILE", str(ca))
    monkeypatch.setenv("CFNESA_REDIS_URL", "rediss://redis:6380/0")
    monkeypatch.setenv("CFNESA_REDIS_USERNAME", "cfnesa")
    monkeypatch.setenv("CFNESA_REDIS_PASSWORD", "redis-pw")
    s = Settings()
    assert s.kafka_security_protocol == "SASL_SSL" and s.kafka_ssl_cafile == ca
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == "hunter2"
    # never in a repr, a str or a log line made of them
    for text in (repr(s), str(s), f"{s}", repr(s.model_dump())):
        assert "hunter2" not in text and "redis-pw" not in text


def test_defaults_are_plaintext():
    s = Settings()
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.redis_url.startswith("redis://")
    assert s.kafka_sasl_password is None and s.redis_password is None


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"kafka_security_protocol": "SASL_SSL"}, "needs kafka_sasl_mechanism"),
        (
            {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN"},
            "needs kafka_sasl_username",
        ),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "SCRAM-SHA-256",
                "kafka_sasl_username": "u",
            },
            "needs kafka_sasl_password or kafka_sasl_password_file",
        ),
        (
            {
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": "SCRAM-SHA-256",
                "kafka_sasl_username": "u",
                "kafka_sasl_password": "p",
                "kafka_sasl_password_file": "/run/secrets/kafka",
            },
            "not both",
        ),
        ({"kafka_sasl_username": "u"}, "kafka_security_protocol is PLAINTEXT"),
        ({"kafka_ssl_cafile": "/ca.pem"}, "SSL or SASL_SSL uses them"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": "/c.pem"},
            "kafka_ssl_certfile needs kafka_ssl_keyfile",
        ),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "/k.pem"},
            "kafka_ssl_keyfile needs kafka_ssl_certfile",
        ),
        ({"kafka_sasl_mechanism": "GSSAPI"}, "kafka_sasl_mechanism"),
        ({"kafka_security_protocol": "TLS"}, "kafka_security_protocol"),
        ({"redis_ssl_cafile": "/ca.pem"}, "not a rediss:// URL"),
        (
            {
                "redis_url": "rediss://r:6380",
                "redis_ssl_certfile": "/c.pem",
            },
            "redis_ssl_certfile needs redis_ssl_keyfile",
        ),
        ({"redis_password": "a", "redis_password_file": "/p"}, "not both"),
        (
            {"redis_url": "redis://:inline@r:6379/0", "redis_password": "b"},
            "give them in one place",
        ),
    ],
)
def test_security_settings_that_cannot_work_are_refused(given, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**given)


def test_a_refusal_never_echoes_a_password():
    with pytest.raises(ValidationError) as caught:
        Settings(kafka_sasl_password="hunter2")  # without SASL: refused
    assert "hunter2" not in str(caught.value)  # what a traceback shows
    from workers.cli import _describe  # what `cfnesa` prints

    assert "kafka_sasl_password set but" in _describe(caught.value)
    assert "hunter2" not in _describe(caught.value)
