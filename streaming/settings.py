"""Settings of the pipeline's processes, from CFNESA_* environment variables.

One class per service (`WorkerSettings`, `FeaturizerSettings`, `GatewaySettings`),
each a `CommonSettings` (Kafka, Redis, their security, shared topics); `Settings` has
them all, for the one-machine commands and the tests. A setting's environment
variable is ``CFNESA_<NAME>`` whichever class reads it.

Every setting has a default that works with `cfnesa services` on one machine;
production points the same code at Apache Kafka and Redis (or Redis Cluster)
by setting, for example, ``CFNESA_KAFKA_BOOTSTRAP=kafka-0:9092,kafka-1:9092``
and ``CFNESA_REDIS_URL=redis://redis:6379/0``. docs/operations.md lists them all.
TLS and SASL for Kafka, TLS and ACL users for Redis are settings too (the
kafka_security_* / redis_ssl_* groups below); `streaming.security` turns them
into client options. Passwords are ``SecretStr``: never in a repr or a log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
ALL_ROLES = ("agent", "customer", "other", "unknown")  # "unknown": the input has no role


class CommonSettings(BaseSettings):
    """What every process reads: Kafka and Redis (with their security), the topics
    shared by several services, consumer timeouts, the model, logging."""

    # hide_input_in_errors: a validation error must not print the passwords it was given
    model_config = SettingsConfigDict(
        env_prefix="CFNESA_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # --- Kafka
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="bootstrap servers, comma-separated"
    )
    input_topic: str = "utterance-features"
    output_topic: str = "emotion-events"
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    fetch_max_wait_ms: int = Field(
        default=10,
        ge=0,
        description="longest a fetch waits at the broker for data (aiokafka's 500 ms default "
        "adds ~150 ms of latency on Tansu)",
    )

    # --- Kafka security (docs/operations.md, "Secure connections"; streaming/security.py)
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        default="PLAINTEXT",
        description="PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)",
    )
    kafka_sasl_mechanism: KafkaSaslMechanism | None = Field(
        default=None, description="SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="never logged; or kafka_sasl_password_file"
    )
    kafka_sasl_password_file: Path | None = Field(
        default=None, description="a file holding the SASL password (a mounted Secret)"
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None, description="CA bundle (PEM) to verify the brokers (default: the system's)"
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="client certificate (PEM) for mutual TLS"
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None, description="the client certificate's private key (PEM)"
    )

    # --- Redis
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="redis://, or rediss:// for TLS"
    )
    redis_cluster: bool = Field(default=False, description="use the Redis Cluster client")
    redis_username: str | None = Field(default=None, description="ACL user (Redis 6+)")
    redis_password: SecretStr | None = Field(
        default=None, description="never logged; or redis_password_file"
    )
    redis_password_file: Path | None = Field(
        default=None, description="a file holding the Redis password (a mounted Secret)"
    )
    redis_ssl_cafile: Path | None = Field(
        default=None,
        description="rediss://: CA bundle (PEM) to verify Redis (default: the system's)",
    )
    redis_ssl_certfile: Path | None = Field(
        default=None, description="rediss://: client certificate (PEM) for mutual TLS"
    )
    redis_ssl_keyfile: Path | None = Field(
        default=None, description="rediss://: the client certificate's private key (PEM)"
    )
    key_prefix: str = Field(default="cfnesa", description="prefix of every Redis key")
    state_ttl_s: int = Field(
        default=3_600, ge=1, description="idle conversations expire after this"
    )
    ended_ttl_s: int = Field(
        default=600, ge=1, description="how long an ended call's summary is kept"
    )
    recent_events: int = Field(default=64, ge=1, description="output events kept per conversation")
    recent_ended_calls: int = Field(
        default=20,
        ge=0,
        description="ended calls listed per tenant for the gateway's all-calls snapshot",
    )

    max_message_bytes: int = Field(default=1_000_000, ge=1_024)

    # --- model, alerts, outputs
    checkpoint: Path | None = Field(
        default=None,
        description='model folder, or a shipped pair by name: "meld" (the default), "iemocap"',
    )
    torch_threads: int = Field(default=0, ge=0, description="0: torch's default")
    # --- operations
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_security(self) -> Self:
        """Security settings that cannot work together are refused at start, by name."""
        problems = []
        protocol = self.kafka_security_protocol
        sasl = protocol.startswith("SASL_")
        tls = protocol in ("SSL", "SASL_SSL")
        if sasl:
            if self.kafka_sasl_mechanism is None:
                problems.append(f"kafka_security_protocol {protocol} needs kafka_sasl_mechanism")
            if not self.kafka_sasl_username:
                problems.append(f"kafka_security_protocol {protocol} needs kafka_sasl_username")
            if self.kafka_sasl_password is None and self.kafka_sasl_password_file is None:
                problems.append(
                    f"kafka_security_protocol {protocol} needs kafka_sasl_password or "
                    "kafka_sasl_password_file"
                )
        else:
            given = [
                name
                for name in (
                    "kafka_sasl_mechanism",
                    "kafka_sasl_username",
                    "kafka_sasl_password",
                    "kafka_sasl_password_file",
                )
                if getattr(self, name) is not None
            ]
            if given:
                problems.append(
                    f"{', '.join(given)} set but kafka_security_protocol is {protocol} "
                    "(SASL_SSL or SASL_PLAINTEXT uses them)"
                )
        if self.kafka_sasl_password is not None and self.kafka_sasl_password_file is not None:
            problems.append("give kafka_sasl_password or kafka_sasl_password_file, not both")
        kafka_tls = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
        given = [name for name in kafka_tls if getattr(self, name) is not None]
        if given and not tls:
            problems.append(
                f"{', '.join(given)} set but kafka_security_protocol is {protocol} "
                "(SSL or SASL_SSL uses them)"
            )
        problems += _cert_key_pair("kafka", self.kafka_ssl_certfile, self.kafka_ssl_keyfile)

        rediss = self.redis_url.startswith("rediss://")
        redis_tls = ("redis_ssl_cafile", "redis_ssl_certfile", "redis_ssl_keyfile")
        given = [name for name in redis_tls if getattr(self, name) is not None]
        if given and not rediss:
            problems.append(f"{', '.join(given)} set but redis_url is not a rediss:// URL")
        problems += _cert_key_pair("redis", self.redis_ssl_certfile, self.redis_ssl_keyfile)
        if self.redis_password is not None and self.redis_password_file is not None:
            problems.append("give redis_password or redis_password_file, not both")
        if _url_has_credentials(self.redis_url) and (
            self.redis_username is not None
            or self.redis_password is not None
            or self.redis_password_file is not None
        ):
            problems.append(
                "redis_url carries a user or password and redis_username / redis_password "
                "are set too: give them in one place"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]


class WorkerSettings(CommonSettings):
    """`cfnesa worker`: its group, batching, state cache, alerts and HTTP endpoint."""

    dlq_topic: str = "utterance-features.dlq"
    group_id: str = Field(default="cfnesa-workers", description="the workers' consumer group")
    group_instance_id: str | None = Field(
        default=None,
        description="static group membership (e.g. the pod name): a restarted worker "
        "takes its partitions back without a rebalance",
    )
    rebalance_timeout_ms: int = Field(default=30_000, ge=1_000)
    # --- batching and caching
    max_batch_events: int = Field(default=256, ge=1, description="most input events per batch")
    max_wait_ms: int = Field(
        default=2, ge=0, description="after the first input of a batch, wait this long for more"
    )
    overlap_batches: bool = Field(
        default=False,
        description="produce and commit a batch while the next one is polled and processed "
        "(outputs and offsets stay in order; issue 15 measured it: docs/pipeline.md)",
    )
    state_cache: bool = Field(
        default=True, description="keep owned conversations' states in memory"
    )
    max_cached_states: int = Field(default=50_000, ge=0)
    alert_rules: Path | None = Field(
        default=None, description="alert rules TOML (default: built in)"
    )
    include_text: bool = Field(default=False, description="copy transcripts into emotion events")
    analyze_roles: str = Field(
        default=",".join(ALL_ROLES),
        description="roles whose emotions are inferred, comma-separated (agent, customer, "
        "other, unknown); the others only advance the call's model state (docs/operations.md: "
        "the EU AI Act forbids inferring employees' emotions at work)",
    )
    metrics_port: int = Field(
        default=9400, ge=0, le=65535, description="the worker's /metrics and /healthz (0: none)"
    )

    @field_validator("analyze_roles")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL_ROLES]
        if unknown or not names:
            raise ValueError(
                f"analyze_roles must name some of {', '.join(ALL_ROLES)}; got {value!r}"
            )
        return ",".join(n for n in ALL_ROLES if n in names)

    def analyzed_roles(self) -> frozenset[str]:
        """The roles whose emotions are inferred ("unknown": no role given)."""
        return frozenset(self.analyze_roles.split(","))


class FeaturizerSettings(CommonSettings):
    """`cfnesa featurize`: its input topic, its encoder and its HTTP endpoint."""

    text_topic: str = "utterance-text"
    encoder_adapter: str = Field(
        default="",
        description="the featurizer's encoder adapter folder (cfnesa finetune-encoder); "
        "none: plain MiniLM; empty: the installed adapter that makes the features of "
        "`checkpoint` when one is set, else the shipped adapter",
    )
    encoder_backend: Literal["onnx", "torch"] = Field(
        default="onnx",
        description="the featurizer's text encoder runtime: onnx (ONNX Runtime; exported "
        "once into the cache folder) or torch; the same vectors either way",
    )

    featurizer_metrics_port: int = Field(
        default=9401,
        ge=0,
        le=65535,
        description="the featurizer's /metrics and /healthz (0: none)",
    )


class GatewaySettings(CommonSettings):
    """`cfnesa gateway` (docs/gateway.md)."""

    gateway_host: str = Field(default="127.0.0.1", description="where the gateway listens")
    gateway_port: int = Field(default=8765, ge=0, le=65535, description="0: any free port")
    gateway_secret: str | None = Field(
        default=None,
        repr=False,  # never in logs or tracebacks
        description="signs the gateway's bearer tokens; unset: `cfnesa gateway` makes a "
        "random one whose tokens die with the process",
    )
    gateway_send_buffer_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="gateway: kernel send buffer per client socket (0: the OS's, which hides "
        "a stalled client for seconds)",
    )
    client_queue: int = Field(
        default=1000, ge=1, description="gateway: messages waiting per client before 4008"
    )
    max_frame_bytes: int = Field(
        default=64 * 1024, ge=1024, description="gateway: largest frame a client may send"
    )
    ping_interval_s: float = Field(
        default=20.0, ge=0, description="gateway: keepalive ping interval and timeout (0: off)"
    )
    snapshot_events: int | None = Field(
        default=None, ge=1, description="gateway: events per snapshot (default: recent_events)"
    )
    gateway_snapshot_calls: int = Field(
        default=200,
        ge=0,
        description="gateway: most active calls snapshotted on `subscribe all` (the most "
        "recently active; the others show up when they next speak)",
    )


class Settings(WorkerSettings, FeaturizerSettings, GatewaySettings):
    """Every setting: what the one-machine commands (demo, services, replay, tail) and
    the tests use. A service takes its own class; this one is a subclass of each."""


def _cert_key_pair(service: str, certfile: Path | None, keyfile: Path | None) -> list[str]:
    if certfile is not None and keyfile is None:
        return [
            f"{service}_ssl_certfile needs {service}_ssl_keyfile (the client certificate's key)"
        ]
    if keyfile is not None and certfile is None:
        return [f"{service}_ssl_keyfile needs {service}_ssl_certfile"]
    return []


def _url_has_credentials(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return bool(parts.username or parts.password)
