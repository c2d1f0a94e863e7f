"""Shared real services for the pipeline tests: one embedded Tansu broker and one
redis-server for the session; each test isolates itself with its own topics,
consumer group and Redis key prefix (``support.new_pipeline``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support import Pipeline, new_pipeline

from model.engine import StreamingEngine
from streaming.embedded import EmbeddedKafka, EmbeddedRedis


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedKafka]:
    with EmbeddedKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def engine() -> StreamingEngine:
    return StreamingEngine.load()


@pytest.fixture
async def pipeline(kafka: EmbeddedKafka, redis_server: EmbeddedRedis) -> Pipeline:
    pipe = new_pipeline(kafka.bootstrap, redis_server.url)
    await pipe.create_topics()
    return pipe
