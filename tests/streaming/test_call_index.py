"""The per-tenant index of calls in progress (streaming/call_index.py) against a real
redis-server and the real 3-master Redis Cluster: what workers write, what the
gateway reads, ends, bounds and expiry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from redis.crc import key_slot

from streaming.call_index import CallActivity, CallIndex
from streaming.gateway.auth import DEFAULT_TENANT as GATEWAY_DEFAULT_TENANT
from streaming.state_store import StateStore

MakeIndex = Callable[..., CallIndex]
T = 1_764_000_000.0  # a fixed "now": the tests move time by passing it


@pytest.fixture(params=["redis", "cluster"])
async def make_index(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[MakeIndex]:
    cluster = request.param == "cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")
    store = StateStore.connect(server.url, cluster=cluster, prefix=unique)

    def make(state_ttl_s: int = 3600, ended_ttl_s: int = 600, keep_ended: int = 3) -> CallIndex:
        return CallIndex(
            store, state_ttl_s=state_ttl_s, ended_ttl_s=ended_ttl_s, keep_ended=keep_ended
        )

    yield make
    keys = [k async for k in store.client.scan_iter(match=f"{unique}:*")]
    for key in keys:
        await store.client.delete(key)
    await store.close()


async def test_calls_enter_on_activity_and_move_to_ended(make_index: MakeIndex):
    index = make_index()
    await index.record(
        [CallActivity("c1", "acme"), CallActivity("c2", "acme"), CallActivity("d1", None)], T
    )
    await index.record([CallActivity("c3", "acme")], T + 1)
    await index.record([CallActivity("c1", "acme")], T + 2)  # c1 speaks again
    view = await index.read("acme", max_active=10, max_ended=10, now=T + 3)
    assert view.active == ["c1", "c3", "c2"]  # most recently active first
    assert (view.active_total, view.ended, view.truncated) == (3, [], False)
    # events without a tenant are the gateway's default tenant's
    assert GATEWAY_DEFAULT_TENANT == "default"
    default = await index.read("default", max_active=10, max_ended=10, now=T + 3)
    assert default.active == ["d1"]
    assert (await index.read("globex", max_active=10, max_ended=10, now=T + 3)).active == []

    # the end moves the call; a late "active" write (a worker that lost the call in a
    # rebalance) does not bring it back
    await index.record([CallActivity("c2", "acme", ended=True)], T + 4)
    await index.record([CallActivity("c2", "acme")], T + 5)
    view = await index.read("acme", max_active=10, max_ended=10, now=T + 6)
    assert (view.active, view.active_total, view.ended) == (["c1", "c3"], 2, ["c2"])

    # an utterance and the end in one batch: ended
    await index.record([CallActivity("c4", "acme"), CallActivity("c4", "acme", ended=True)], T + 7)
    view = await index.read("acme", max_active=1, max_ended=10, now=T + 8)
    assert view.ended == ["c4", "c2"]  # latest first
    assert (view.active, view.active_total, view.truncated) == (["c1"], 2, True)  # the bound


async def test_ended_calls_are_bounded_and_everything_expires(make_index: MakeIndex):
    index = make_index(state_ttl_s=100, ended_ttl_s=80, keep_ended=3)
    await index.record([CallActivity(f"e{i}", "acme", ended=True) for i in range(2)], T)
    await index.record([CallActivity(f"e{i}", "acme", ended=True) for i in range(2, 5)], T + 1)
    await index.record([CallActivity("old", "acme")], T)
    await index.record([CallActivity("new", "acme")], T + 60)
    view = await index.read("acme", max_active=10, max_ended=10, now=T + 61)
    assert len(view.ended) == 3 and set(view.ended) == {"e2", "e3", "e4"}  # trimmed to 3
    assert view.active == ["new", "old"]
    # reads skip what outlived its state, writes drop it
    view = await index.read("acme", max_active=10, max_ended=10, now=T + 120)
    assert (view.active, view.active_total, view.ended) == (["new"], 1, [])
    client = index.client
    await index.record([CallActivity("newer", "acme")], T + 120)
    assert await client.zrange(index.active_key("acme"), 0, -1) == [b"new", b"newer"]
    assert await client.zcard(index.ended_key("acme")) == 0
    assert 0 < await client.ttl(index.active_key("acme")) <= 100  # the keys expire too
    await index.record([CallActivity("x", "acme", ended=True)], T + 121)
    assert 0 < await client.ttl(index.ended_key("acme")) <= 80


async def test_a_tenants_keys_share_one_cluster_slot(make_index: MakeIndex, unique: str):
    index = make_index()
    for tenant in ("acme", "default", "a{b}c", "globex"):
        active, ended = index.active_key(tenant), index.ended_key(tenant)
        assert active.startswith(f"{unique}:calls:") and active != ended
        assert key_slot(active.encode()) == key_slot(ended.encode())
    # many tenants in one batch: one script per tenant (on a cluster, on their nodes)
    tenants = [f"tenant-{i}" for i in range(8)]
    await index.record([CallActivity(f"call-{t}", t) for t in tenants], T)
    for t in tenants:
        view = await index.read(t, max_active=5, max_ended=5, now=T + 1)
        assert view.active == [f"call-{t}"]
    if index.cluster:
        nodes = {index.client.get_node_from_key(index.active_key(t)).port for t in tenants}
        assert len(nodes) >= 2, nodes
