"""Per-conversation state in Redis, advanced by compare-and-set.

Keys of one conversation share its hash tag, so one Lua script touches them all
atomically, also on Redis Cluster::

    {prefix}:{<conversation_id>}:state    hash: seq, model state parts, app state, ...
    {prefix}:{<conversation_id>}:events   list: the last K output events (JSON)
    {prefix}:{<conversation_id>}:texts    sorted set: the featurizer's last texts, by seq

A commit names the seq the writer believes is current; the script applies the
write only if Redis agrees, and then sets the new seq, the changed fields and
the new output events, and refreshes the TTL, all at once. A writer with a
stale view (a cached state from before a rebalance, a replay after a crash)
gets a conflict and the current seq instead, and never overwrites newer state.

Stored events are kept compact: each is deflated against a preset dictionary of the
output events' JSON (`pack_event`: ~495 bytes of an emotion event become ~150), and
`events` inflates them back, so readers (the gateway's snapshots, the worker's
re-emission of duplicates) get each event's JSON bytes exactly as they were written.
An entry that would not shrink, or written by older code, is stored as is and
read as is.

This module stores bytes; what they mean is the worker's business.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from streaming.security import redis_client_options

if TYPE_CHECKING:
    from streaming.settings import CommonSettings

SEQ = b"seq"

# A stored event packed by `pack_event`: this prefix (JSON never starts with NUL; the
# last byte names the dictionary), then raw deflate against _EVENT_DICT_1.
_PACKED = b"\x00z1"
# Version 1's dictionary: what output events repeat (field names, labels, the model
# name, the shape of times and numbers), the most frequent (an emotion event) last,
# where deflate reaches it most cheaply. NEVER edit it: stored events name it. A
# better one gets a new prefix byte, and `unpack_event` keeps reading this one.
_EVENT_DICT_1 = (
    b'{"type":"summary","utterances":{},"speakers":{},"shifts":0,"alerts":{},"gaps":0,'
    b'"first_ts":null,"last_ts":null,"duration_s":0.0,"dominant":{}}'
    b'{"type":"alert","event_id":":alert:negative_onset","rule":"negative_onset",'
    b'"severity":"high","from_emotion":"neutral","to_emotion":"anger","p_shift":0.'
    b'"detail":{"score":0.,"threshold":0.,"rule":"emotion_shift","sustained_negative"}'
    b'"frustrated","happy","excited","angry","sad","medium","low","agent",'
    b'"cfnesa-iemocap-minilm@","sentiment":"negative","positive","role":"customer",'
    b'{"type":"emotion","event_id":"call-0001:12:emotion","conversation_id":"call-0001",'
    b'"seq":12,"tenant":null,"speaker":"customer","emotion":"neutral","confidence":0.5,'
    b'"probabilities":{"neutral":0.1,"surprise":0.0,"fear":0.0,"sadness":0.0,'
    b'"joy":0.0,"disgust":0.0,"anger":0.0},"shift":{"vs_previous":0.4,'
    b'"vs_speaker_previous":0.3},"model":"cfnesa-meld-minilm@","ts":"2026-12-02T09:00:'
    b'00.000Z","emitted_at":"2026-12-02T09:00:00.000Z","gap":false,"text":null}'
)

# KEYS[1] the state hash, KEYS[2] the events list
# ARGV: expected seq ('' = must not exist), new seq, ttl s, events kept, mode
#       ('update' | 'replace'), number of field pairs n, n field/value pairs,
#       then the output events to append
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'seq')
if ARGV[1] == '' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[1] then
  return {0, cur or ''}
end
if ARGV[5] == 'replace' then redis.call('DEL', KEYS[1]) end
local n = tonumber(ARGV[6])
local fields = {'seq', ARGV[2]}
for i = 7, 6 + 2 * n do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local first = 7 + 2 * n
if #ARGV >= first then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, first))
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {1, ARGV[2]}
"""


@dataclass(frozen=True)
class Stored:
    """What Redis holds for one conversation (seq None: nothing)."""

    seq: int | None
    fields: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Commit:
    """One conversation's write: applied only if Redis's seq is ``expected_seq``.

    ``replace`` drops every other field of the hash first (a reset after a model
    change, or the tombstone left by `end`).
    """

    conversation_id: str
    expected_seq: int | None
    new_seq: int
    fields: Mapping[str, bytes]
    events: Sequence[bytes] = ()
    ttl_s: int = 3600
    replace: bool = False

    @functools.cached_property
    def stored_events(self) -> list[bytes]:
        """The events as the list stores them (`pack_event`)."""
        return [pack_event(e) for e in self.events]

    @property
    def size(self) -> int:
        """Bytes of values this commit sends."""
        return sum(len(v) for v in self.fields.values()) + sum(len(e) for e in self.stored_events)


@dataclass(frozen=True)
class CommitResult:
    ok: bool
    current_seq: int | None


_CLUSTER_CONCURRENCY = 64  # scripts in flight at once on a Redis Cluster


class StateStore:
    """Async access to conversation state; works with Redis and Redis Cluster clients."""

    def __init__(self, client: Any, *, prefix: str = "cfnesa", recent_events: int = 64) -> None:
        self.client = client
        self.prefix = prefix
        if recent_events < 1:
            raise ValueError(f"recent_events must be >= 1, got {recent_events}")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"the key prefix {prefix!r} must not contain braces (hash tags)")
        self.recent_events = recent_events
        self._commit = client.register_script(_COMMIT)
        from redis.asyncio.cluster import RedisCluster

        self._cluster = isinstance(client, RedisCluster)

    @property
    def cluster(self) -> bool:
        """The client is a Redis Cluster client (no scripts in its pipelines)."""
        return self._cluster

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        cluster: bool = False,
        prefix: str = "cfnesa",
        recent_events: int = 64,
        client_options: Mapping[str, Any] | None = None,
    ) -> StateStore:
        """A store on a Redis URL (``cluster``: Redis Cluster, any node's URL).

        ``client_options`` go to redis-py's ``from_url`` (TLS files, ACL user and
        password: `streaming.security.redis_client_options`).
        """
        opts: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        opts.update(client_options or {})
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            client: Any = RedisCluster.from_url(url, **opts)
        else:
            client = aioredis.from_url(url, **opts)
        return cls(client, prefix=prefix, recent_events=recent_events)

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> StateStore:
        """A store on the settings' Redis: URL, cluster, key prefix, recent events, and
        the TLS and ACL settings (no I/O yet: the first command connects)."""
        return cls.connect(
            settings.redis_url,
            cluster=settings.redis_cluster,
            prefix=settings.key_prefix,
            recent_events=settings.recent_events,
            client_options=redis_client_options(settings),
        )

    def state_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:{{{_tag(conversation_id)}}}:state"

    def events_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:{{{_tag(conversation_id)}}}:events"

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def load(self, conversation_ids: Iterable[str]) -> dict[str, Stored]:
        """Everything stored for these conversations, in one round trip."""
        ids = list(dict.fromkeys(conversation_ids))
        if not ids:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hgetall(self.state_key(cid))
            rows = await pipe.execute()
        out = {}
        for cid, row in zip(ids, rows, strict=True):
            fields = {k.decode(): v for k, v in row.items()}
            seq = fields.pop(SEQ.decode(), None)
            out[cid] = Stored(seq=None if seq is None else int(seq), fields=fields)
        return out

    async def events(
        self, conversation_ids: Iterable[str], last: int | None = None
    ) -> dict[str, list[bytes]]:
        """The recent output events of these conversations (the ``last`` ones of each,
        default all kept), oldest first, in one round trip."""
        ids = list(dict.fromkeys(conversation_ids))
        if not ids:
            return {}
        start = 0 if last is None else -max(last, 1)
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.lrange(self.events_key(cid), start, -1)
            rows = await pipe.execute()
        return {cid: [unpack_event(e) for e in row] for cid, row in zip(ids, rows, strict=True)}

    async def commit(self, commits: Sequence[Commit]) -> list[CommitResult]:
        """Apply the writes, each atomically and independently, in one round trip (on a
        cluster: concurrent round trips, one per write)."""
        if not commits:
            return []
        rows: list[Any]
        if self._cluster:
            # redis-py's cluster pipeline refuses scripts; each EVALSHA goes to the node
            # owning its call's hash tag, up to _CLUSTER_CONCURRENCY at a time. Several
            # writes of one conversation go in successive waves, so they keep their order.
            waves: list[list[int]] = []
            seen: dict[str, int] = {}
            for i, c in enumerate(commits):
                n = seen[c.conversation_id] = seen.get(c.conversation_id, -1) + 1
                if n == len(waves):
                    waves.append([])
                waves[n].append(i)
            rows = [None] * len(commits)
            for wave in waves:
                for at in range(0, len(wave), _CLUSTER_CONCURRENCY):
                    part = wave[at : at + _CLUSTER_CONCURRENCY]
                    got = await asyncio.gather(
                        *(
                            self._commit(keys=self._keys(commits[i]), args=self._args(commits[i]))
                            for i in part
                        )
                    )
                    for i, row in zip(part, got, strict=True):
                        rows[i] = row
        else:
            async with self.client.pipeline(transaction=False) as pipe:
                for c in commits:
                    await self._commit(keys=self._keys(c), args=self._args(c), client=pipe)
                rows = await pipe.execute()
        out = []
        for ok, cur in rows:
            cur = cur.decode() if isinstance(cur, bytes) else str(cur)
            out.append(CommitResult(ok=bool(ok), current_seq=int(cur) if cur else None))
        return out

    def _keys(self, c: Commit) -> list[str]:
        return [self.state_key(c.conversation_id), self.events_key(c.conversation_id)]

    def _args(self, c: Commit) -> list[Any]:
        args: list[Any] = [
            "" if c.expected_seq is None else str(c.expected_seq),
            str(c.new_seq),
            str(c.ttl_s),
            str(self.recent_events),
            "replace" if c.replace else "update",
            str(len(c.fields)),
        ]
        for k, v in c.fields.items():
            args += [k, v]
        args += c.stored_events
        return args

    def texts_key(self, conversation_id: str) -> str:
        return f"{self.prefix}:{{{_tag(conversation_id)}}}:texts"

    async def recent_texts(
        self, conversation_ids: Iterable[str], keep: int
    ) -> dict[str, list[tuple[int, str]]]:
        """The last ``keep`` utterance texts of these conversations as (seq, text), oldest
        first, in one round trip (the featurizer's causal context)."""
        ids = list(dict.fromkeys(conversation_ids))
        if not ids or keep < 1:
            return {cid: [] for cid in ids}
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.zrange(self.texts_key(cid), -keep, -1)
            rows = await pipe.execute()
        out: dict[str, list[tuple[int, str]]] = {}
        for cid, members in zip(ids, rows, strict=True):
            texts = []
            for member in members:
                seq, _, text = member.decode("utf-8").partition(":")
                texts.append((int(seq), text))
            out[cid] = texts
        return out

    async def remember_texts(
        self, texts: Sequence[tuple[str, int, str]], keep: int, ttl_s: int
    ) -> None:
        """Add (conversation id, seq, text) to the conversations' recent texts, keep the
        last ``keep`` by seq and refresh the TTL, in one round trip. Idempotent: a
        re-sent utterance replaces itself."""
        if not texts or keep < 1:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for cid, seq, text in texts:
                key = self.texts_key(cid)
                pipe.zremrangebyscore(key, seq, seq)
                pipe.zadd(key, {f"{seq}:{text}".encode(): seq})
            for cid in dict.fromkeys(cid for cid, _, _ in texts):
                key = self.texts_key(cid)
                pipe.zremrangebyrank(key, 0, -keep - 1)
                pipe.expire(key, ttl_s)
            await pipe.execute()

    async def forget_texts(self, conversation_ids: Iterable[str], ttl_s: int) -> None:
        """Let ended conversations' recent texts expire after ``ttl_s``."""
        ids = list(dict.fromkeys(conversation_ids))
        if not ids:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.expire(self.texts_key(cid), ttl_s)
            await pipe.execute()

    async def delete(self, conversation_id: str) -> None:
        await self.client.delete(self.state_key(conversation_id), self.events_key(conversation_id))

    async def close(self) -> None:
        await self.client.aclose()


def pack_event(event: bytes) -> bytes:
    """An output event as the recent-events list stores it: deflated against the
    events' dictionary, or as is when that is not shorter (`unpack_event` reverses
    it exactly)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, _EVENT_DICT_1)
    packed = _PACKED + packer.compress(event) + packer.flush()
    # as is only when shorter and unambiguous (an entry starting with NUL is always packed)
    return event if len(event) <= len(packed) and not event.startswith(b"\x00") else packed


def unpack_event(stored: bytes) -> bytes:
    """The event's bytes as written, from what `pack_event` stored (or older code:
    plain JSON, returned as is).

    Raises:
        zlib.error: a packed entry that is corrupt.
    """
    if not stored.startswith(_PACKED):
        return stored
    unpacker = zlib.decompressobj(-15, _EVENT_DICT_1)
    return unpacker.decompress(stored[len(_PACKED) :]) + unpacker.flush()


def _tag(conversation_id: str) -> str:
    """The id inside the hash tag, with braces escaped: Redis Cluster hashes the text
    between the first ``{`` and the next ``}``, so a brace in the id must not end it."""
    return conversation_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
