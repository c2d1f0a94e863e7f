"""The Redis state store against a real redis-server: compare-and-set, events, TTLs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import pytest
from redis.crc import key_slot

from streaming.state_store import Commit, CommitResult, StateStore, Stored

MakeStore = Callable[..., StateStore]


@pytest.fixture(params=["redis", "cluster"])
async def make_store(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[MakeStore]:
    """Stores under this test's own key prefix, on the shared redis-server and on the
    shared 3-master Redis Cluster (the same script, routed by hash tag); closed at the end."""
    stores: list[StateStore] = []
    cluster = request.param == "cluster"
    server = request.getfixturevalue("redis_cluster" if cluster else "redis_server")

    def make(*, recent_events: int = 4) -> StateStore:
        store = StateStore.connect(
            server.url, cluster=cluster, prefix=unique, recent_events=recent_events
        )
        stores.append(store)
        return store

    yield make
    if stores:
        keys = [k async for k in stores[0].client.scan_iter(match=f"{unique}:*")]
        for key in keys:
            await stores[0].client.delete(key)
    for store in stores:
        await store.close()


@pytest.fixture
def store(make_store: MakeStore) -> StateStore:
    return make_store()


async def test_keys_carry_the_conversation_hash_tag(store: StateStore, unique: str):
    assert store.state_key("call-1") == f"{unique}:{{call-1}}:state"
    assert store.events_key("call-1") == f"{unique}:{{call-1}}:events"
    assert store.state_key("call-1") != store.events_key("call-1")
    assert store.state_key("call-1") != store.state_key("call-2")


@pytest.mark.parametrize("cid", ["call-0001", "a", "x{y", "a}b", "tenant:call/7", "ümlaut 😀"])
def test_keys_of_one_conversation_share_a_cluster_slot(store: StateStore, cid: str):
    assert key_slot(store.state_key(cid).encode()) == key_slot(store.events_key(cid).encode())
    # and the slot is the conversation's alone (the hash tag), whatever the prefix
    other = StateStore(store.client, prefix="another-prefix")
    assert key_slot(store.state_key(cid).encode()) == key_slot(other.state_key(cid).encode())


def test_keys_share_a_slot_even_when_the_id_starts_with_a_brace(store: StateStore):
    cid = "}call-1"
    assert key_slot(store.state_key(cid).encode()) == key_slot(store.events_key(cid).encode())


async def test_nothing_stored_loads_as_none(store: StateStore):
    assert await store.load([]) == {}
    assert await store.events([]) == {}
    assert await store.load(["nope"]) == {"nope": Stored(seq=None, fields={})}
    assert await store.events(["nope"]) == {"nope": []}


async def test_first_commit_creates_and_a_second_create_conflicts(store: StateStore):
    first = Commit("c1", expected_seq=None, new_seq=0, fields={"model": b"v0"}, events=[b"e0"])
    assert await store.commit([first]) == [CommitResult(ok=True, current_seq=0)]
    again = Commit("c1", expected_seq=None, new_seq=0, fields={"model": b"other"}, events=[b"x"])
    assert await store.commit([again]) == [CommitResult(ok=False, current_seq=0)]
    assert await store.load(["c1"]) == {"c1": Stored(seq=0, fields={"model": b"v0"})}
    assert await store.events(["c1"]) == {"c1": [b"e0"]}


async def test_expected_seq_on_a_missing_conversation_conflicts(store: StateStore):
    result = await store.commit([Commit("c1", expected_seq=3, new_seq=4, fields={"m": b"x"})])
    assert result == [CommitResult(ok=False, current_seq=None)]
    assert await store.load(["c1"]) == {"c1": Stored(seq=None, fields={})}
    assert not await store.client.exists(store.state_key("c1"), store.events_key("c1"))


async def test_wrong_expected_seq_changes_nothing(store: StateStore):
    await store.commit(
        [Commit("c1", None, 0, {"model": b"v0", "app": b"a0"}, events=[b"e0"], ttl_s=500)]
    )
    await store.commit([Commit("c1", 0, 1, {"model": b"v1"}, events=[b"e1"], ttl_s=500)])
    before = await store.load(["c1"]), await store.events(["c1"])
    assert before == ({"c1": Stored(1, {"model": b"v1", "app": b"a0"})}, {"c1": [b"e0", b"e1"]})

    for stale in (None, 0, 2, 7):
        bad = Commit("c1", stale, 2, {"model": b"BAD", "new": b"BAD"}, [b"BAD"], ttl_s=9999)
        assert await store.commit([bad]) == [CommitResult(ok=False, current_seq=1)]
        bad_replace = Commit("c1", stale, 2, {"x": b"BAD"}, [b"BAD"], ttl_s=9999, replace=True)
        assert await store.commit([bad_replace]) == [CommitResult(ok=False, current_seq=1)]
    assert (await store.load(["c1"]), await store.events(["c1"])) == before
    # a conflict does not refresh the TTL either
    assert await store.client.ttl(store.state_key("c1")) <= 500
    assert await store.client.ttl(store.events_key("c1")) <= 500


async def test_right_seq_applies_fields_and_appends_events(store: StateStore):
    await store.commit([Commit("c1", None, 0, {"model": b"v0", "app": b"a0"}, [b"e0"])])
    result = await store.commit([Commit("c1", 0, 1, {"model": b"v1", "extra": b"x"}, [b"e1"])])
    assert result == [CommitResult(ok=True, current_seq=1)]
    stored = (await store.load(["c1"]))["c1"]
    assert stored == Stored(seq=1, fields={"model": b"v1", "app": b"a0", "extra": b"x"})
    assert (await store.events(["c1"]))["c1"] == [b"e0", b"e1"]
    # seq may jump (a gap); fields-only and events-less commits are fine
    assert await store.commit([Commit("c1", 1, 5, {})]) == [CommitResult(True, 5)]
    assert (await store.load(["c1"]))["c1"].seq == 5
    assert (await store.events(["c1"]))["c1"] == [b"e0", b"e1"]


async def test_events_are_trimmed_to_the_last_k(make_store: MakeStore):
    store = make_store(recent_events=3)
    await store.commit([Commit("c1", None, 0, {}, [b"e0", b"e1"])])
    await store.commit([Commit("c1", 0, 1, {}, [b"e2", b"e3"])])
    assert (await store.events(["c1"]))["c1"] == [b"e1", b"e2", b"e3"]
    # more events in one commit than K: the newest K stay
    await store.commit([Commit("c1", 1, 2, {}, [b"e4", b"e5", b"e6", b"e7", b"e8"])])
    assert (await store.events(["c1"]))["c1"] == [b"e6", b"e7", b"e8"]


async def test_replace_drops_old_fields_but_keeps_events(store: StateStore):
    await store.commit([Commit("c1", None, 0, {"model": b"v0", "app": b"a0"}, [b"e0"])])
    result = await store.commit([Commit("c1", 0, 1, {"reset": b"yes"}, [b"e1"], replace=True)])
    assert result == [CommitResult(ok=True, current_seq=1)]
    assert (await store.load(["c1"]))["c1"] == Stored(seq=1, fields={"reset": b"yes"})
    assert (await store.events(["c1"]))["c1"] == [b"e0", b"e1"]
    # a tombstone with no fields at all still keeps the seq
    await store.commit([Commit("c1", 1, 2, {}, replace=True)])
    assert (await store.load(["c1"]))["c1"] == Stored(seq=2, fields={})


async def test_ttl_is_set_on_both_keys_and_refreshed(store: StateStore):
    client = store.client
    keys = store.state_key("c1"), store.events_key("c1")
    await store.commit([Commit("c1", None, 0, {"m": b"0"}, [b"e0"], ttl_s=100)])
    for key in keys:
        assert 90 <= await client.ttl(key) <= 100
    # refreshed on every write, also on the events key when this write has no events
    await store.commit([Commit("c1", 0, 1, {"m": b"1"}, ttl_s=5000)])
    for key in keys:
        assert 4990 <= await client.ttl(key) <= 5000
    await store.commit([Commit("c1", 1, 2, {}, [b"e2"], ttl_s=200, replace=True)])
    for key in keys:
        assert 190 <= await client.ttl(key) <= 200


async def test_many_commits_in_one_call_are_independent(store: StateStore):
    await store.commit([Commit("a", None, 0, {"m": b"a0"}), Commit("b", None, 0, {"m": b"b0"})])
    results = await store.commit(
        [
            Commit("a", 0, 1, {"m": b"a1"}, [b"ea1"]),
            Commit("b", 5, 6, {"m": b"BAD"}, [b"BAD"]),  # conflicts
            Commit("c", None, 0, {"m": b"c0"}, [b"ec0"]),
            Commit("d", 0, 1, {"m": b"BAD"}),  # conflicts: nothing stored
        ]
    )
    assert results == [
        CommitResult(True, 1),
        CommitResult(False, 0),
        CommitResult(True, 0),
        CommitResult(False, None),
    ]
    loaded = await store.load(["a", "b", "c", "d", "a"])
    assert list(loaded) == ["a", "b", "c", "d"]
    assert loaded == {
        "a": Stored(1, {"m": b"a1"}),
        "b": Stored(0, {"m": b"b0"}),
        "c": Stored(0, {"m": b"c0"}),
        "d": Stored(None, {}),
    }
    assert await store.events(["a", "b", "c", "d"]) == {
        "a": [b"ea1"],
        "b": [],
        "c": [b"ec0"],
        "d": [],
    }
    assert await store.commit([]) == []


async def test_two_commits_of_one_conversation_in_one_call_apply_in_order(store: StateStore):
    results = await store.commit(
        [
            Commit("c1", None, 0, {"m": b"0"}, [b"e0"]),
            Commit("c1", 0, 1, {"m": b"1"}, [b"e1"]),
            Commit("c1", 0, 1, {"m": b"stale"}, [b"stale"]),
        ]
    )
    assert results == [CommitResult(True, 0), CommitResult(True, 1), CommitResult(False, 1)]
    assert (await store.load(["c1"]))["c1"] == Stored(1, {"m": b"1"})
    assert (await store.events(["c1"]))["c1"] == [b"e0", b"e1"]


async def test_binary_values_round_trip_exactly(store: StateStore):
    rng_bytes = [os.urandom(n) for n in (1, 7, 256, 4096, 65536)]
    fields = {f"part{i}": b for i, b in enumerate(rng_bytes)}
    fields["zeros"] = b"\x00" * 33
    fields["empty"] = b""
    fields["tricky"] = b"\x00seq\x00\xff\xfe-1\r\n"
    events = [b"\x00", b"\xff\x00\x80" + os.urandom(100), b'{"type":"emotion"}']
    cid = "bin:{x} ü"
    assert await store.commit([Commit(cid, None, 0, fields, events)]) == [CommitResult(True, 0)]
    assert (await store.load([cid]))[cid] == Stored(0, fields)
    assert (await store.events([cid]))[cid] == events[-store.recent_events :]


async def test_concurrent_writers_on_the_same_seq_one_wins(make_store: MakeStore):
    one, two = make_store(), make_store()
    await one.commit([Commit("c1", None, 0, {"w": b"start"})])
    for round_ in range(10):
        mine = Commit("c1", round_, round_ + 1, {"w": b"one"}, [b"one%d" % round_])
        theirs = Commit("c1", round_, round_ + 1, {"w": b"two"}, [b"two%d" % round_])
        [a], [b] = await asyncio.gather(one.commit([mine]), two.commit([theirs]))
        assert sorted([a.ok, b.ok]) == [False, True]
        assert a.current_seq == b.current_seq == round_ + 1
        winner = b"one" if a.ok else b"two"
        stored = (await two.load(["c1"]))["c1"]
        assert stored == Stored(round_ + 1, {"w": winner})
        assert (await one.events(["c1"]))["c1"][-1] == winner + b"%d" % round_


async def test_concurrent_creators_one_wins(make_store: MakeStore):
    one, two = make_store(), make_store()
    [a], [b] = await asyncio.gather(
        one.commit([Commit("c1", None, 0, {"w": b"one"}, [b"one"])]),
        two.commit([Commit("c1", None, 0, {"w": b"two"}, [b"two"])]),
    )
    assert sorted([a.ok, b.ok]) == [False, True]
    winner = b"one" if a.ok else b"two"
    assert (await one.load(["c1"]))["c1"] == Stored(0, {"w": winner})
    assert (await one.events(["c1"]))["c1"] == [winner]


async def test_delete_removes_both_keys(store: StateStore):
    await store.commit([Commit("c1", None, 0, {"m": b"x"}, [b"e"])])
    await store.commit([Commit("c2", None, 0, {"m": b"y"}, [b"e"])])
    await store.delete("c1")
    assert not await store.client.exists(store.state_key("c1"), store.events_key("c1"))
    assert await store.load(["c1", "c2"]) == {
        "c1": Stored(None, {}),
        "c2": Stored(0, {"m": b"y"}),
    }
    # a deleted conversation can start again from scratch
    assert await store.commit([Commit("c1", None, 0, {})]) == [CommitResult(True, 0)]
    await store.delete("never-existed")


async def test_prefixes_isolate_stores(store: StateStore, unique):
    other = StateStore(store.client, prefix=f"{unique}x")  # the same server, another prefix
    try:
        await store.commit([Commit("c1", None, 0, {"m": b"mine"})])
        assert (await other.load(["c1"]))["c1"] == Stored(None, {})
        assert await other.commit([Commit("c1", None, 0, {"m": b"other"})]) == [
            CommitResult(True, 0)
        ]
        assert (await store.load(["c1"]))["c1"] == Stored(0, {"m": b"mine"})
    finally:
        await other.delete("c1")


async def test_ping(store: StateStore):
    assert await store.ping() is True


async def test_recent_texts_keep_the_last_k_by_seq_and_expire(store: StateStore):
    """The featurizer's call context: the last k texts by seq (not by arrival), a
    re-sent seq replaces itself, one round trip for many calls, TTLs set."""
    assert await store.recent_texts(["a", "b"], 3) == {"a": [], "b": []}
    await store.remember_texts(
        [("a", 1, "one"), ("a", 0, "zero: with a colon"), ("b", 0, "ünï")], 3, 60
    )
    await store.remember_texts([("a", 3, "three"), ("a", 2, "two"), ("a", 3, "three")], 3, 60)
    got = await store.recent_texts(["a", "b", "c"], 3)
    assert got == {"a": [(1, "one"), (2, "two"), (3, "three")], "b": [(0, "ünï")], "c": []}
    assert await store.recent_texts(["a"], 1) == {"a": [(3, "three")]}
    assert 0 < await store.client.ttl(store.texts_key("a")) <= 60
    assert await store.client.zcard(store.texts_key("a")) == 3  # trimmed to k
    await store.forget_texts(["a"], 5)
    assert 0 < await store.client.ttl(store.texts_key("a")) <= 5
