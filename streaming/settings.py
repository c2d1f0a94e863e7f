"""Settings of the pipeline's processes, from CFNESA_* environment variables.

Every setting has a default that works with `cfnesa services` on one machine;
production points the same code at Apache Kafka and Redis (or Redis Cluster)
by setting, for example, ``CFNESA_KAFKA_BOOTSTRAP=kafka-0:9092,kafka-1:9092``
and ``CFNESA_REDIS_URL=redis://redis:6379/0``. docs/operations.md lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """What a worker, featurizer, replayer or gateway reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="CFNESA_", extra="ignore", frozen=True)

    # --- Kafka
    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="bootstrap servers, comma-separated"
    )
    input_topic: str = "utterance-features"
    output_topic: str = "emotion-events"
    dlq_topic: str = "utterance-features.dlq"
    text_topic: str = "utterance-text"
    group_id: str = Field(default="cfnesa-workers", description="the workers' consumer group")
    group_instance_id: str | None = Field(
        default=None,
        description="static group membership (e.g. the pod name): a restarted worker "
        "takes its partitions back without a rebalance",
    )
    rebalance_timeout_ms: int = Field(default=30_000, ge=1_000)
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    fetch_max_wait_ms: int = Field(
        default=10,
        ge=0,
        description="longest a fetch waits at the broker for data (aiokafka's 500 ms default "
        "adds ~150 ms of latency on Tansu)",
    )

    # --- Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = Field(default=False, description="use the Redis Cluster client")
    key_prefix: str = Field(default="cfnesa", description="prefix of every Redis key")
    state_ttl_s: int = Field(
        default=3_600, ge=1, description="idle conversations expire after this"
    )
    ended_ttl_s: int = Field(
        default=600, ge=1, description="how long an ended call's summary is kept"
    )
    recent_events: int = Field(default=64, ge=1, description="output events kept per conversation")

    # --- batching and caching
    max_batch_events: int = Field(default=256, ge=1, description="most input events per batch")
    max_wait_ms: int = Field(
        default=2, ge=0, description="after the first input of a batch, wait this long for more"
    )
    state_cache: bool = Field(
        default=True, description="keep owned conversations' states in memory"
    )
    max_cached_states: int = Field(default=50_000, ge=0)
    max_message_bytes: int = Field(default=1_000_000, ge=1_024)

    # --- model, alerts, outputs
    checkpoint: Path | None = Field(
        default=None,
        description='model folder, or a shipped pair by name: "meld" (the default), "iemocap"',
    )
    alert_rules: Path | None = Field(
        default=None, description="alert rules TOML (default: built in)"
    )
    include_text: bool = Field(default=False, description="copy transcripts into emotion events")
    torch_threads: int = Field(default=0, ge=0, description="0: torch's default")
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

    # --- operations
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535, description="0: no metrics server")
    log_level: str = "INFO"

    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]

    # --- gateway (`cfnesa gateway`, docs/gateway.md)
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
