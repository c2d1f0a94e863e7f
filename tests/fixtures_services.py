"""Real embedded services for tests, as a pytest plugin (no mocks).

Register it once, in tests/conftest.py::

    pytest_plugins = ["fixtures_services"]

(tests/ is on sys.path because tests/conftest.py lives there and the tests have no
``__init__.py``). A test module may also say the same line itself; loading twice is
harmless.

Fixtures:

- ``kafka`` / ``redis_server``: one Tansu broker and one redis-server for the whole
  session. Shared: never stop, restart or kill them; isolate each test with its own
  names (``unique``) for topics, consumer groups and Redis key prefixes.
- ``redis_cluster``: a real 3-master Redis Cluster (redis-server in cluster mode,
  slots assigned) for the whole session; shared like ``redis_server``.
- ``private_redis``: a redis-server of the test's own, free to stop, restart or kill
  (about 0.1 s to start).
- ``unique``: a short name unique to this test run, e.g. ``t3f9a1c2e``.

- ``fast_group``: aiokafka consumer settings (``FAST_GROUP``) under which a Tansu
  rebalance after a member dies takes about ``session_timeout_ms + 1 s`` instead of
  the defaults' 11+ s.
- ``scaled``: the function ``scale_timeout(seconds)``, which multiplies by
  CFNESA_TEST_TIMEOUT_FACTOR.

The fixtures hand out the helpers so that a test module needs no ``import`` of this
plugin (importing it before pytest registers it triggers PytestAssertRewriteWarning).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from streaming.embedded import EmbeddedKafka, EmbeddedRedis, EmbeddedRedisCluster

TIMEOUT_FACTOR = float(os.environ.get("CFNESA_TEST_TIMEOUT_FACTOR", "1"))

FAST_GROUP: dict[str, int] = {
    # Tansu honours session timeouts below Apache Kafka's 6 s broker minimum; a member
    # that dies is dropped after session_timeout_ms, and the join phase advances in
    # steps of about a second. heartbeat_interval_ms must stay under a third of it.
    "session_timeout_ms": int(2000 * TIMEOUT_FACTOR),
    "heartbeat_interval_ms": int(300 * TIMEOUT_FACTOR),
    "rebalance_timeout_ms": int(2000 * TIMEOUT_FACTOR),
}


def scale_timeout(seconds: float) -> float:
    """A test timeout, stretched on slow machines (CFNESA_TEST_TIMEOUT_FACTOR)."""
    return seconds * TIMEOUT_FACTOR


@pytest.fixture(scope="session")
def scaled() -> Callable[[float], float]:
    """``scale_timeout``: ``scaled(5)`` is 5 s times CFNESA_TEST_TIMEOUT_FACTOR."""
    return scale_timeout


@pytest.fixture(scope="session")
def fast_group() -> dict[str, int]:
    """aiokafka consumer keyword arguments for quick Tansu joins and rebalances."""
    return dict(FAST_GROUP)


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    """The session's shared broker: use your own topic and group names."""
    broker = EmbeddedKafka()
    try:
        yield broker.start(timeout=scale_timeout(30))
    finally:
        broker.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """The session's shared redis-server: use your own key prefix."""
    server = EmbeddedRedis()
    try:
        yield server.start(timeout=scale_timeout(30))
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    """The session's shared 3-master Redis Cluster: use your own key prefix."""
    cluster = EmbeddedRedisCluster(masters=3)
    try:
        yield cluster.start(timeout=scale_timeout(30))
    finally:
        cluster.close()


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own (stop, restart, kill at will)."""
    server = EmbeddedRedis()
    try:
        yield server.start(timeout=scale_timeout(30))
    finally:
        server.close()


@pytest.fixture
def unique() -> str:
    """A name no other test uses: prefix topics, groups and keys with it."""
    return f"t{uuid.uuid4().hex[:8]}"
