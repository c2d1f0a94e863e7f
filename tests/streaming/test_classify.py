"""The one classification of failures, the backoff and the health report (no I/O)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NotLeaderForPartitionError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from streaming.errors import (
    FatalError,
    MissingTopicError,
    ServiceRefusedError,
    StateConflictError,
    StreamError,
)
from streaming.faults import Backoff, Health, classify
from streaming.security import AuthenticationFailedError


@pytest.mark.parametrize(
    ("exc", "service"),
    [
        (SlotNotCoveredError('Slot "12" is not covered by the cluster.'), "redis"),
        (
            RedisClusterException("All slots are not covered after query all startup_nodes."),
            "redis",
        ),
        (ClusterDownError("The cluster is down"), "redis"),
        (RedisConnectionError("Connection refused"), "redis"),
        (ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"), "redis"),
        (KafkaConnectionError("no broker"), "kafka"),
        (KafkaTimeoutError("batch expired"), "kafka"),
        (NotLeaderForPartitionError(), "kafka"),
        (UnknownTopicOrPartitionError(), "kafka"),  # a leader moving; start-up checks topics
        (StateConflictError(["call-1"]), "conflict"),
    ],
)
def test_what_waiting_fixes_is_transient(exc: BaseException, service: str):
    error = classify(exc)
    assert error.retriable and error.service == service
    assert error is exc or error.__cause__ is exc


@pytest.mark.parametrize(
    "exc",
    [
        TopicAuthorizationFailedError(),
        GroupAuthorizationFailedError(),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ResponseError("NOSCRIPT No matching script."),
        ResponseError("WRONGPASS invalid username-password pair"),
        MissingTopicError(["utterance-features"]),
        ValueError("a bug"),
    ],
)
def test_what_waiting_does_not_fix_is_fatal(exc: BaseException):
    error = classify(exc)
    assert isinstance(error, FatalError) and not error.retriable


def test_one_tree():
    assert issubclass(AuthenticationFailedError, FatalError)
    assert isinstance(classify(ResponseError("WRONGTYPE x")), ServiceRefusedError)
    for cls in (StateConflictError, MissingTopicError, ServiceRefusedError):
        assert issubclass(cls, StreamError)


async def test_backoff_doubles_to_its_cap_and_a_stop_ends_the_wait_at_once():
    b = Backoff(initial_s=0.1, max_s=0.3)
    assert [b.next_delay() for _ in range(4)] == [0.1, 0.2, 0.3, 0.3]
    b.reset()
    assert b.next_delay() == 0.1
    stop = asyncio.Event()
    stop.set()
    assert await b.wait(stop, 60) is False  # returns at once, not after 60 s


def test_health_reports_the_outage_its_cause_and_since_when():
    h = Health()
    assert h.report()[0] is False  # not started yet
    h.started = True
    assert h.report()[0] is True
    h.degrade(classify(RedisConnectionError("Connection refused")))
    ok, body = h.report()
    since = body["since"]
    assert not ok and body["outage"] == "redis" and "refused" in body["cause"] and since
    h.degrade(classify(RedisConnectionError("timed out")))
    assert h.report()[1]["since"] == since and "timed out" in h.report()[1]["cause"]
    h.recover()
    assert h.report() == (True, h.report()[1]) and h.report()[1]["outage"] is None
