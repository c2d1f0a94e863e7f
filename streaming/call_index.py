"""Which calls are in progress, per tenant: the index behind the gateway's all-calls snapshot.

Two sorted sets per tenant, under one hash tag per tenant (so one script touches
both, also on Redis Cluster)::

    {prefix}:calls:{<tenant>}:active   conversation id -> last activity (Unix seconds)
    {prefix}:calls:{<tenant>}:ended    conversation id -> when it ended; the latest
                                       ``keep_ended`` only

Workers write it right after their compare-and-set commits, one script call per
tenant of the batch (one pipeline on a single Redis): a call enters ``active`` on
its first utterance and its score follows its activity; the summary's commit moves
it to ``ended``. Conversation keys are hash-tagged per conversation, so this
cannot share their Lua script on a cluster: a worker that dies between the two
writes leaves the index behind, and the replay of its batch (offsets are committed
only after the outputs are produced) writes it. Entries expire with the state they
point at: ``active`` entries idle for longer than ``state_ttl_s`` and ``ended``
ones older than ``ended_ttl_s`` are dropped at every write and skipped by every
read, and both keys carry the same TTLs.

A call that ended is never put back into ``active`` (a late write from a worker
that lost the call in a rebalance would otherwise resurrect it); its id can be
used again once its ``ended`` entry has expired, as its state has by then.

The summaries themselves stay where the worker stored them (the call's recent
events, `streaming.state_store`): readers take ids from here and events from there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streaming.state_store import StateStore

__all__ = ["DEFAULT_TENANT", "CallActivity", "CallIndex", "IndexView", "call_tenant"]

DEFAULT_TENANT = "default"  # the tenant of events that carry none


def call_tenant(tenant: str | None) -> str:
    """The tenant a call belongs to: its events' own, or the default tenant."""
    return DEFAULT_TENANT if tenant is None else tenant


@dataclass(frozen=True)
class CallActivity:
    """One call touched by a batch.

    Attributes:
        conversation_id: the call.
        tenant: its events' tenant; None: the default tenant.
        ended: the batch committed (or replayed) the call's end.
    """

    conversation_id: str
    tenant: str | None
    ended: bool = False


@dataclass(frozen=True)
class IndexView:
    """What `CallIndex.read` found for one tenant.

    Attributes:
        active: calls in progress, most recently active first, at most the bound asked.
        active_total: how many calls are in progress in all.
        ended: the most recently ended calls, latest first.
    """

    active: list[str]
    active_total: int
    ended: list[str]

    @property
    def truncated(self) -> bool:
        return self.active_total > len(self.active)


# KEYS[1] active, KEYS[2] ended
# ARGV: now, state ttl s, ended ttl s, ended kept, n, n active ids, then ended ids
_RECORD = """
local now = tonumber(ARGV[1])
local state_ttl = tonumber(ARGV[2])
local ended_ttl = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - state_ttl))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - ended_ttl))
for i = 6, 5 + n do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now, ARGV[i])
  end
end
for i = 6 + n, #ARGV do
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZADD', KEYS[2], 'NX', now, ARGV[i])
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -keep - 1)
redis.call('EXPIRE', KEYS[1], state_ttl)
redis.call('EXPIRE', KEYS[2], ended_ttl)
return 1
"""


class CallIndex:
    """The per-tenant index of active and recently ended calls, on the store's Redis.

    Args:
        store: the conversation store (its client, key prefix and cluster mode are used).
        state_ttl_s: an active call idle for longer is dropped (its state has expired).
        ended_ttl_s: an ended call is listed this long (as long as its summary is kept).
        keep_ended: the most ended calls listed per tenant.
    """

    def __init__(
        self, store: StateStore, *, state_ttl_s: int, ended_ttl_s: int, keep_ended: int
    ) -> None:
        if min(state_ttl_s, ended_ttl_s) < 1 or keep_ended < 0:
            raise ValueError("the TTLs must be >= 1 s and keep_ended >= 0")
        self.client = store.client
        self.prefix = store.prefix
        self.cluster = store.cluster
        self.state_ttl_s = state_ttl_s
        self.ended_ttl_s = ended_ttl_s
        self.keep_ended = keep_ended
        self._record = self.client.register_script(_RECORD)

    def active_key(self, tenant: str) -> str:
        return f"{self.prefix}:calls:{{{_tag(tenant)}}}:active"

    def ended_key(self, tenant: str) -> str:
        return f"{self.prefix}:calls:{{{_tag(tenant)}}}:ended"

    async def record(self, calls: Iterable[CallActivity], now: float | None = None) -> None:
        """Write a batch's calls: one script call per tenant, in one round trip (on a
        cluster: one per tenant, concurrently)."""
        by_tenant: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        for call in calls:
            active, ended = by_tenant.setdefault(call_tenant(call.tenant), ({}, {}))
            (ended if call.ended else active)[call.conversation_id] = None
        if not by_tenant:
            return
        at = time.time() if now is None else now
        jobs = []
        for tenant, (active, ended) in by_tenant.items():
            live = [c for c in active if c not in ended]  # ended in this batch: ended
            keys = [self.active_key(tenant), self.ended_key(tenant)]
            args: list[Any] = [
                f"{at:.3f}",
                str(self.state_ttl_s),
                str(self.ended_ttl_s),
                str(self.keep_ended),
                str(len(live)),
                *live,
                *ended,
            ]
            jobs.append((keys, args))
        if self.cluster:  # redis-py's cluster pipeline refuses scripts
            await asyncio.gather(*(self._record(keys=k, args=a) for k, a in jobs))
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args in jobs:
                await self._record(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def read(
        self, tenant: str, *, max_active: int, max_ended: int, now: float | None = None
    ) -> IndexView:
        """The tenant's active calls (most recently active first, at most ``max_active``),
        how many there are, and its last ``max_ended`` ended calls, in one round trip."""
        at = time.time() if now is None else now
        active_from = f"{at - self.state_ttl_s:.3f}"
        ended_from = f"{at - self.ended_ttl_s:.3f}"
        active_key, ended_key = self.active_key(tenant), self.ended_key(tenant)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcount(active_key, active_from, "+inf")
            pipe.zrevrangebyscore(active_key, "+inf", active_from, start=0, num=max(max_active, 0))
            pipe.zrevrangebyscore(ended_key, "+inf", ended_from, start=0, num=max(max_ended, 0))
            total, active, ended = await pipe.execute()
        ended_ids = [c.decode() for c in ended] if max_ended > 0 else []
        gone = set(ended_ids)
        active_ids = [c.decode() for c in active] if max_active > 0 else []
        return IndexView([c for c in active_ids if c not in gone], int(total), ended_ids)


def _tag(tenant: str) -> str:
    """The tenant inside the hash tag, braces escaped (as conversation ids' are)."""
    return tenant.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
