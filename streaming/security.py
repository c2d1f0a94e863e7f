"""Secure connections to Kafka and Redis, from settings alone.

`kafka_client_options` turns the kafka_security_* settings into the keyword
arguments every aiokafka client of the product takes (producer, consumer, admin);
`redis_client_options` does the same for redis-py (single Redis and Redis
Cluster). TLS always verifies the server's certificate and its host name
(``ssl.create_default_context``); a CA file replaces the system's trust store.

A secure connection that cannot work is not an outage: a wrong password or an
untrusted certificate stays wrong however long a worker waits. So start-up names
the cause and stops instead of retrying (`start_kafka_client`, `security_failure`),
and the commands exit non-zero. aiokafka itself hides the cause: a client's
``start()`` logs it and raises ``KafkaConnectionError("Unable to bootstrap ...")``,
so a failed start is diagnosed with one more connection attempt of our own.

Errors::

    ConnectionSecurityError             retriable = False: never retried
     ├── SecurityConfigError            a file named by a setting is missing or unusable
     ├── AuthenticationFailedError      the server refused the credentials
     └── TlsError                       the TLS handshake failed
          └── CertificateVerifyError    the server's certificate is not trusted (or not
                                        for that host name)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError as KafkaAuthenticationFailedError,
)
from aiokafka.errors import (
    AuthenticationMethodNotSupported,
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from pydantic import SecretStr
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import AuthenticationWrongNumberOfArgsError, ResponseError

from streaming.errors import FatalError
from streaming.settings import CommonSettings, Settings

__all__ = [
    "PLAINTEXT",
    "AuthenticationFailedError",
    "CertificateVerifyError",
    "ConnectionSecurityError",
    "SecurityConfigError",
    "TlsError",
    "diagnose_kafka",
    "kafka_client_options",
    "read_secret",
    "redact_url",
    "redis_client_options",
    "security_failure",
    "ssl_context",
    "start_kafka_client",
]

log = logging.getLogger(__name__)

# Every security setting at its default: what `cfnesa demo` passes so that a shell
# configured for production cannot point it at the embedded (plaintext) services.
_SECURITY_SETTINGS = (
    "kafka_security_",
    "kafka_sasl_",
    "kafka_ssl_",
    "redis_username",
    "redis_password",
    "redis_ssl_",
)
PLAINTEXT: dict[str, Any] = {
    name: field.default
    for name, field in Settings.model_fields.items()
    if name.startswith(_SECURITY_SETTINGS)
}

_DIAGNOSE_TIMEOUT_S = 10.0


class ConnectionSecurityError(FatalError):
    """A secure connection cannot work as configured; retrying will not help."""

    retriable = False

    def __init__(self, reason: str, *, service: str = "", address: str = "") -> None:
        self.reason = reason
        self.address = address
        where = " at ".join(p for p in (service, address) if p)
        super().__init__(f"{where}: {reason}" if where else reason, service=service)


class SecurityConfigError(ConnectionSecurityError):
    """A CA, certificate, key or password file cannot be used."""


class AuthenticationFailedError(ConnectionSecurityError):
    """The server refused the username and password (SASL, Redis AUTH)."""


class TlsError(ConnectionSecurityError):
    """The TLS handshake failed (a plaintext port, no client certificate, ...)."""


class CertificateVerifyError(TlsError):
    """The server's certificate is not signed by a trusted CA, or names another host."""


# ------------------------------------------------------------------ options


def read_secret(value: SecretStr | None, path: Path | None, setting: str) -> str | None:
    """The secret given inline, else the contents of ``path`` without its trailing
    newline (a Kubernetes Secret mounted as a file, or one written by ``echo``).

    Raises:
        SecurityConfigError: the file cannot be read or is empty.
    """
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"{setting} {path}: cannot read it ({exc})") from exc
    if not text:
        raise SecurityConfigError(f"{setting} {path} is empty")
    return text


def ssl_context(
    cafile: Path | None, certfile: Path | None, keyfile: Path | None, *, service: str
) -> ssl.SSLContext:
    """A client TLS context that verifies the server's certificate and host name
    against ``cafile`` (None: the system's CAs), presenting ``certfile``/``keyfile``
    when given (mutual TLS).

    Raises:
        SecurityConfigError: a file is missing, or not PEM, or the key does not match.
    """
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(
            f"{service}_ssl_cafile {cafile}: not a readable PEM CA bundle ({exc})"
        ) from exc
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        try:
            context.load_cert_chain(str(certfile), str(keyfile) if keyfile else None)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityConfigError(
                f"{service}_ssl_certfile {certfile} / {service}_ssl_keyfile {keyfile}: "
                f"not a readable PEM certificate and matching key ({exc})"
            ) from exc
    return context


def kafka_client_options(settings: CommonSettings) -> dict[str, Any]:
    """Keyword arguments for every aiokafka client (``AIOKafkaProducer``,
    ``AIOKafkaConsumer``, ``AIOKafkaAdminClient``) from the kafka_security_* settings.

    Raises:
        SecurityConfigError: a file named by a setting cannot be used.
    """
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(
            settings.kafka_ssl_cafile,
            settings.kafka_ssl_certfile,
            settings.kafka_ssl_keyfile,
            service="kafka",
        )
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = read_secret(
            settings.kafka_sasl_password,
            settings.kafka_sasl_password_file,
            "kafka_sasl_password_file",
        )
    return options


def redis_client_options(settings: CommonSettings) -> dict[str, Any]:
    """Keyword arguments for ``redis.asyncio.from_url`` and ``RedisCluster.from_url``
    from the redis_* security settings (TLS ones only for a ``rediss://`` URL).

    Raises:
        SecurityConfigError: a file named by a setting cannot be used.
    """
    options: dict[str, Any] = {}
    if settings.redis_username is not None:
        options["username"] = settings.redis_username
    password = read_secret(
        settings.redis_password, settings.redis_password_file, "redis_password_file"
    )
    if password is not None:
        options["password"] = password
    if settings.redis_url.startswith("rediss://"):
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(settings, f"redis_ssl_{name}")
            if path is not None and not path.is_file():
                raise SecurityConfigError(f"redis_ssl_{name} {path}: no such file")
        options.update(
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
            ssl_ca_certs=_str(settings.redis_ssl_cafile),
            ssl_certfile=_str(settings.redis_ssl_certfile),
            ssl_keyfile=_str(settings.redis_ssl_keyfile),
        )
    return options


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


# ------------------------------------------------------------------ failures

_KAFKA_AUTH = (
    SaslAuthenticationFailed,
    KafkaAuthenticationFailedError,
    AuthenticationMethodNotSupported,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
# aiokafka's SCRAM client reads the server's final message without looking for an
# error attribute: a broker that answers "e=unknown-user" or "e=invalid-proof" (RFC
# 5802, what Tansu does) makes it raise KeyError('v') from here.
_SCRAM_STEPS = frozenset({"process_server_first_message", "process_server_final_message"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _scram_rejected(exc: BaseException) -> bool:
    if not isinstance(exc, KeyError | ValueError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _SCRAM_STEPS and "aiokafka" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def security_failure(
    exc: BaseException, *, service: str = "", address: str = ""
) -> ConnectionSecurityError | None:
    """The security cause of a connection failure, as a typed error; None when the
    failure may pass (a server down, a timeout) and is worth retrying."""
    for e in _chain(exc):
        if isinstance(e, ConnectionSecurityError):
            return e
        if isinstance(e, ssl.SSLCertVerificationError):
            return CertificateVerifyError(
                f"certificate verify failed: {e.verify_message or e.reason}",
                service=service,
                address=address,
            )
        if isinstance(e, ssl.SSLError):
            return TlsError(
                f"TLS handshake failed: {e.reason or e}", service=service, address=address
            )
        if isinstance(e, _KAFKA_AUTH):
            return AuthenticationFailedError(
                f"authentication failed: {type(e).__name__}: {e}",
                service=service,
                address=address,
            )
        if _scram_rejected(e):
            return AuthenticationFailedError(
                "authentication failed: the broker rejected the SCRAM credentials",
                service=service,
                address=address,
            )
        if isinstance(e, RedisAuthenticationError | AuthenticationWrongNumberOfArgsError) or (
            isinstance(e, ResponseError) and str(e).startswith(("WRONGPASS", "NOAUTH"))
        ):
            return AuthenticationFailedError(
                f"authentication failed: {e}", service=service, address=address
            )
    return None


# ------------------------------------------------------------------ Kafka start


class _KafkaClient(Protocol):
    async def start(self) -> None: ...


def _hosts(bootstrap: str | list[str]) -> list[tuple[str, int]]:
    servers = bootstrap.split(",") if isinstance(bootstrap, str) else bootstrap
    out = []
    for server in (s.strip() for s in servers):
        if not server:
            continue
        host, _, port = server.rpartition(":")
        if not host:
            host, port = server, "9092"
        out.append((host.strip("[]"), int(port)))
    return out


async def diagnose_kafka(
    bootstrap: str | list[str],
    options: Mapping[str, Any],
    timeout_s: float = _DIAGNOSE_TIMEOUT_S,
) -> ConnectionSecurityError | None:
    """Connect to each bootstrap server as a client would (TLS, ApiVersions, SASL)
    and return the first security failure met; None when every failure may pass."""
    for host, port in _hosts(bootstrap):
        address = f"{host}:{port}"
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host,
                    port,
                    client_id="cfnesa-diagnose",
                    request_timeout_ms=int(timeout_s * 1000),
                    **options,
                ),
                timeout_s,
            )
        except Exception as exc:
            failure = security_failure(exc, service="kafka", address=address) or _closed_on_us(
                exc, options, address
            )
            if failure is not None:
                return failure
            log.debug("kafka at %s: %r (not a security failure)", address, exc)
        else:
            conn.close()
    return None


def _closed_on_us(
    exc: BaseException, options: Mapping[str, Any], address: str
) -> ConnectionSecurityError | None:
    """A broker that hangs up at a security step instead of answering.

    Brokers do not always say why: a TLS server that rejects the client's certificate
    (or its absence) under TLS 1.3 may just close the connection after the handshake,
    and Tansu closes it when offered a SASL mechanism it lacks. Which step the
    connection died in tells the cause: a broker that is merely down refuses the TCP
    connection instead.
    """
    if not isinstance(exc, KafkaConnectionError | asyncio.IncompleteReadError):
        return None
    steps = _steps(exc)
    protocol = options.get("security_protocol", "PLAINTEXT")
    if "_do_sasl_handshake" in steps:
        return AuthenticationFailedError(
            f"authentication failed: the broker closed the connection during SASL "
            f"{options.get('sasl_mechanism')} (a mechanism it does not offer, or "
            "credentials it refused)",
            service="kafka",
            address=address,
        )
    if "_do_version_lookup" in steps and protocol in ("SSL", "SASL_SSL"):
        return TlsError(
            "TLS handshake failed: the broker closed the connection right after the "
            "handshake, before its first answer: it requires a client certificate that it "
            "trusts (kafka_ssl_certfile, kafka_ssl_keyfile)",
            service="kafka",
            address=address,
        )
    return None


def _steps(exc: BaseException) -> set[str]:
    """Names of the functions an exception (or one it chains) passed through."""
    names: set[str] = set()
    for e in _chain(exc):
        tb = e.__traceback__
        while tb is not None:
            names.add(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
    return names


async def start_kafka_client(
    client: _KafkaClient, bootstrap: str | list[str], options: Mapping[str, Any]
) -> None:
    """``await client.start()``, with the cause named when security is to blame.

    Raises:
        ConnectionSecurityError: authentication or TLS failed (fatal; the client is
            stopped, or closed for an admin client).
        aiokafka.errors.KafkaError: anything else, as ``start()`` raised it (a broker
            that is down: worth retrying).
    """
    try:
        await client.start()
    except KafkaConnectionError as exc:
        failure = await diagnose_kafka(bootstrap, options)
        if failure is None:
            raise
        await _release(client)
        raise failure from exc
    except (KeyError, ValueError, ssl.SSLError) as exc:
        failure = security_failure(exc, service="kafka", address=_first(bootstrap))
        if failure is None:
            raise
        await _release(client)
        raise failure from exc


async def _release(client: _KafkaClient) -> None:
    # producers and consumers stop(), the admin client close()s
    release = getattr(client, "stop", None) or getattr(client, "close", None)
    if release is not None:
        with contextlib.suppress(Exception):
            await release()


def _first(bootstrap: str | list[str]) -> str:
    hosts = _hosts(bootstrap)
    return f"{hosts[0][0]}:{hosts[0][1]}" if hosts else ""
