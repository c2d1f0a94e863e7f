"""The worker, the featurizer and the commands over secure connections, on real servers:
Kafka behind a TLS proxy (Tansu advertises the proxy), Tansu with SASL, redis-server
with TLS and ACL users (tests/fixtures_tls.py). Settings alone, no mocks.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import time

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fixtures_services import FAST_GROUP, scale_timeout
from support import CFNESA, check_outputs, interleave, make_calls, running

from streaming.security import (
    AuthenticationFailedError,
    CertificateVerifyError,
    kafka_client_options,
    start_kafka_client,
)
from streaming.settings import Settings
from streaming.state_store import StateStore
from streaming.topics import ensure_topics
from workers.featurize import featurize
from workers.tail import tail
from workers.worker import Worker

FAST_S = scale_timeout(10)  # "fails fast": a retry loop would never end


async def _acl_user(url: str, user: str, password: str) -> None:
    admin = aioredis.from_url(url)  # the default user, on the plaintext port
    try:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    finally:
        await admin.aclose()


def _settings(tag: str, **given) -> Settings:
    return Settings(
        **given,
        input_topic=f"{tag}-features",
        output_topic=f"{tag}-events",
        dlq_topic=f"{tag}-features.dlq",
        text_topic=f"{tag}-text",
        group_id=f"{tag}-workers",
        key_prefix=tag,
        metrics_port=0,
        featurizer_metrics_port=0,
        max_wait_ms=5,
        **FAST_GROUP,
    )


async def _produce(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    security = kafka_client_options(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), **security)
    await start_kafka_client(producer, settings.bootstrap_servers(), security)
    try:
        for key, value in messages:
            await producer.send(settings.input_topic, value=value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def _outputs(settings: Settings, emotions: int, timeout_s: float) -> list[dict]:
    """Output events from the start of the topic until ``emotions`` emotion events."""
    security = kafka_client_options(settings)
    consumer = AIOKafkaConsumer(
        settings.output_topic,
        bootstrap_servers=settings.bootstrap_servers(),
        group_id=None,
        auto_offset_reset="earliest",
        **security,
    )
    await start_kafka_client(consumer, settings.bootstrap_servers(), security)
    events: list[dict] = []
    try:
        async with asyncio.timeout(timeout_s):
            while sum(e["type"] == "emotion" for e in events) < emotions:
                batch = await consumer.getmany(timeout_ms=200)
                events += [json.loads(r.value) for part in batch.values() for r in part]
    finally:
        await consumer.stop()
    return events


async def test_worker_over_tls_kafka_and_tls_redis_with_settings_alone(
    tls_kafka, tls_redis, pki, engine, unique, scaled
):
    """A worker configured by settings alone (SSL to Kafka, rediss:// with an ACL user
    to Redis) turns utterances into the same events as over plaintext; its state is in
    the TLS Redis; `cfnesa tail`'s function reads the events over TLS too."""
    await _acl_user(tls_redis.url, unique, "worker-pw")
    settings = _settings(
        unique,
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        redis_url=tls_redis.tls_url,
        redis_ssl_cafile=pki.ca,
        redis_username=unique,
        redis_password="worker-pw",
    )
    await ensure_topics(
        settings.kafka_bootstrap,
        {settings.input_topic: 2, settings.output_topic: 2, settings.dlq_topic: 1},
        scaled(30),
        security=kafka_client_options(settings),
    )
    calls = make_calls(2, 4, seed=5, prefix=unique)
    handshakes = tls_kafka.proxy.handshakes
    async with running(settings, engine):
        await _produce(settings, interleave(calls))
        events = await _outputs(settings, emotions=8, timeout_s=scaled(60))
    check_outputs(engine, calls, [e for e in events if e["type"] == "emotion"])
    assert tls_kafka.proxy.handshakes - handshakes >= 4  # producer, consumers, worker

    store = StateStore.from_settings(settings)
    try:
        stored = await store.events([c.cid for c in calls])
    finally:
        await store.close()
    assert all(len(stored[c.cid]) >= 4 for c in calls), "the state lives in the TLS Redis"

    out = io.StringIO()
    printed = await asyncio.wait_for(
        tail(settings, asyncio.Event(), out, from_beginning=True, max_events=3, raw=True),
        scaled(30),
    )
    assert printed == 3 and all(json.loads(line) for line in out.getvalue().splitlines())


async def test_worker_start_fails_fast_on_rejected_kafka_credentials(sasl_kafka, pki, engine):
    settings = _settings(
        "sasl",
        kafka_bootstrap=sasl_kafka.bootstrap,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="cfnesa",
        kafka_sasl_password="not-the-password",
        kafka_ssl_cafile=pki.ca,
    )
    worker = Worker(settings, engine=engine)
    started = time.monotonic()
    try:
        with pytest.raises(AuthenticationFailedError, match="authentication failed"):
            await worker.start(asyncio.Event())
    finally:
        await worker.close()
    assert time.monotonic() - started < FAST_S


@pytest.mark.parametrize("failure", ["password", "ca"])
async def test_worker_start_fails_fast_on_redis_security(
    tls_kafka, tls_redis, pki, engine, unique, failure
):
    """Kafka is fine; Redis refuses the password, or its certificate is not trusted:
    the worker stops at start instead of retrying what no retry can fix."""
    await _acl_user(tls_redis.url, unique, "right")
    settings = _settings(
        unique,
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        redis_url=tls_redis.tls_url,
        redis_ssl_cafile=pki.rogue_ca if failure == "ca" else pki.ca,
        redis_username=unique,
        redis_password="wrong" if failure == "password" else "right",
    )
    expected = AuthenticationFailedError if failure == "password" else CertificateVerifyError
    worker = Worker(settings, engine=engine)
    started = time.monotonic()
    try:
        with pytest.raises(expected) as caught:
            await worker.start(asyncio.Event())
    finally:
        await worker.close()
    assert time.monotonic() - started < FAST_S
    assert str(caught.value).startswith(f"redis at {tls_redis.tls_url}")


class _UnusedEncoder:
    """Stands in for MiniLM in a featurizer that must stop before encoding anything."""

    feature_spec = "unused"
    context = 0

    def encode(self, texts, contexts=None):
        raise AssertionError("the featurizer encoded despite a failed start")


async def test_featurizer_fails_fast_on_an_untrusted_broker(tls_kafka, pki, unique):
    settings = _settings(
        unique,
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.rogue_ca,
    )
    started = time.monotonic()
    with pytest.raises(CertificateVerifyError, match="certificate verify failed"):
        await featurize(settings, asyncio.Event(), _UnusedEncoder())
    assert time.monotonic() - started < FAST_S


# ---------------------------------------------------------------- the commands


def _command(
    args: list[str], env: dict[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CFNESA), *args],
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _base_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("CFNESA_")}
    return {
        **keep,
        "CFNESA_METRICS_PORT": "0",
        "CFNESA_FEATURIZER_METRICS_PORT": "0",
        "CFNESA_TORCH_THREADS": "1",
    }


def test_commands_exit_non_zero_naming_the_cause(tls_kafka, sasl_kafka, redis_server, pki, scaled):
    """`cfnesa gateway`, `cfnesa featurize` and `cfnesa worker` stop with exit status 1
    and one line that names the cause, instead of retrying forever."""
    untrusted = {
        "CFNESA_KAFKA_BOOTSTRAP": tls_kafka.bootstrap,
        "CFNESA_KAFKA_SECURITY_PROTOCOL": "SSL",
        "CFNESA_KAFKA_SSL_CAFILE": str(pki.rogue_ca),
        "CFNESA_REDIS_URL": redis_server.url,
        "CFNESA_GATEWAY_PORT": "0",
        "CFNESA_GATEWAY_SECRET": "a-test-secret-of-enough-length",
    }
    rejected = {
        "CFNESA_KAFKA_BOOTSTRAP": sasl_kafka.bootstrap,
        "CFNESA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CFNESA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "CFNESA_KAFKA_SASL_USERNAME": "cfnesa",
        "CFNESA_KAFKA_SASL_PASSWORD": "hunter2",
        "CFNESA_KAFKA_SSL_CAFILE": str(pki.ca),
        "CFNESA_REDIS_URL": redis_server.url,
    }
    for args, env, cause in [
        (["gateway"], untrusted, "certificate verify failed"),
        (["featurize"], untrusted, "certificate verify failed"),
        (["worker"], rejected, "authentication failed"),
    ]:
        done = _command(args, env, scaled(120))
        assert done.returncode == 1, (args, done.stderr[-2000:])
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("cfnesa: kafka at ") and cause in last, (args, last)
        assert "Traceback" not in done.stderr and "hunter2" not in done.stderr


def test_invalid_security_settings_exit_2_before_connecting():
    done = _command(["worker"], {"CFNESA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, 60)
    assert done.returncode == 2
    assert "kafka_security_protocol SASL_SSL needs kafka_sasl_mechanism" in done.stderr


async def test_worker_start_fails_fast_on_a_refused_redis_cluster_password(
    tls_kafka, tls_redis_cluster, pki, engine, unique
):
    """On Redis Cluster the refusal arrives wrapped in a RedisClusterException (the
    client cannot initialize): still named, still fatal."""
    tls_redis_cluster.acl_user(unique, "right")
    settings = _settings(
        unique,
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        redis_url=tls_redis_cluster.tls_url,
        redis_cluster=True,
        redis_ssl_cafile=pki.ca,
        redis_username=unique,
        redis_password="wrong",
    )
    worker = Worker(settings, engine=engine)
    started = time.monotonic()
    try:
        with pytest.raises(AuthenticationFailedError, match="authentication failed"):
            await worker.start(asyncio.Event())
    finally:
        await worker.close()
    assert time.monotonic() - started < FAST_S


def test_the_demo_stays_plaintext_whatever_the_shell_exports(monkeypatch, pki):
    """`cfnesa demo` runs on embedded plaintext services: security settings exported
    for production reach neither its own clients nor its child processes."""
    from streaming.security import PLAINTEXT, redis_client_options
    from workers.demo import _env

    exported = {
        "CFNESA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CFNESA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "CFNESA_KAFKA_SASL_USERNAME": "prod",
        "CFNESA_KAFKA_SASL_PASSWORD": "prod-password",
        "CFNESA_KAFKA_SSL_CAFILE": str(pki.ca),
        "CFNESA_REDIS_USERNAME": "prod",
        "CFNESA_REDIS_PASSWORD_FILE": "/run/secrets/redis",
    }
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    assert Settings().kafka_security_protocol == "SASL_SSL"  # the shell's, as exported
    settings = Settings(**PLAINTEXT, kafka_bootstrap="127.0.0.1:1")
    assert kafka_client_options(settings) == {"security_protocol": "PLAINTEXT"}
    assert redis_client_options(settings) == {}
    env = _env(settings.model_copy(update={"gateway_secret": "x" * 32}))
    assert not set(exported) & set(env)
    assert {f"CFNESA_{name.upper()}" for name in PLAINTEXT} >= set(exported)
