"""Pipeline test fixtures. The broker and redis-server (``kafka``, ``redis_server``)
are the session-wide ones of tests/fixtures_services.py; each test isolates itself
with its own topics, consumer group and Redis key prefix (``support.new_pipeline``)."""

from __future__ import annotations

import pytest
from support import Pipeline, new_pipeline

from model.engine import StreamingEngine
from streaming.embedded import EmbeddedKafka, EmbeddedRedis


@pytest.fixture(scope="session")
def engine() -> StreamingEngine:
    return StreamingEngine.load()


@pytest.fixture
async def pipeline(kafka: EmbeddedKafka, redis_server: EmbeddedRedis) -> Pipeline:
    pipe = new_pipeline(kafka.bootstrap, redis_server.url)
    await pipe.create_topics()
    return pipe
