"""Shared state in Redis: one stream of events per cluster, and a heartbeat key per replica.

Keys (``<cluster>`` from ``--cluster``, default "default")::

    prefix-router:<cluster>:events             stream; each entry {"e": <msgpack event>}
    prefix-router:<cluster>:replica:<replica>  heartbeat, value = replica id, EX ttl

Publishing is one pipelined ``XADD ... MAXLEN ~ maxlen`` per event (one round trip per
batch); the approximate trim keeps the stream at about `maxlen` entries (default 100k, tens of
MB at most) at no extra cost. Reading is ``XREAD COUNT n BLOCK ms`` after the last id seen.
The first read, and the first after a failure, anchors at the stream's current last entry
(``XREVRANGE + - COUNT 1``): a plain ``XREAD $`` in a loop would lose whatever was added
between two calls, and replaying history after an outage would apply stale work as if it were
queued now. The replica's own entries are skipped (its policy already knows them).

Heartbeats are Redis keys with a TTL, so expiry runs on the Redis server's clock and the hosts'
clocks never need to agree; `replicas()` lists them with SCAN (a few keys per replica).

Every Redis or socket error is raised as `StateUnavailable`; the client reconnects by itself
on the next command (redis-py's pool), and the caller decides how long to wait. redis-py's own
retries are switched off so a dead server is noticed at once rather than after its backoff.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.state.events import Event, EventError, IncompatibleReplicaError, decode, encode
from router.state.protocol import Endpoint, StateUnavailable

__all__ = ["KEY_PREFIX", "RedisState"]

log = logging.getLogger(__name__)

KEY_PREFIX = "prefix-router"
_FIELD = b"e"
_MAX_BLOCK_S = 5.0  # longest XREAD BLOCK; a longer read timeout returns early and empty


class RedisState(Endpoint):
    """This replica's end of the cluster's Redis stream (module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        cluster: str = "default",
        replica: str | None = None,
        maxlen: int = 100_000,
        batch: int = 512,
        connect_timeout_s: float = 2.0,
    ) -> None:
        if maxlen <= 0 or batch <= 0:
            raise ValueError("maxlen and batch must be positive")
        super().__init__(replica=replica, cluster=cluster)
        self.url = url
        self.maxlen = maxlen
        self.batch = batch
        self.events_key = f"{KEY_PREFIX}:{self._cluster}:events"
        self._replica_prefix = f"{KEY_PREFIX}:{self._cluster}:replica:"
        self._connect_timeout_s = connect_timeout_s
        self._client: aioredis.Redis | None = None
        self._last_id: bytes | None = None
        self._malformed = 0
        self._mismatched = 0

    @property
    def malformed(self) -> int:
        return self._malformed

    @property
    def mismatched(self) -> int:
        """Events refused because their replica speaks another version or hash scheme."""
        return self._mismatched

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_connect_timeout=self._connect_timeout_s,
                # Above any XREAD BLOCK we issue, so a blocked read is not cut short.
                socket_timeout=_MAX_BLOCK_S + 5.0,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
        return self._client

    async def publish(self, events: Sequence[Event]) -> None:
        if not events:
            return
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.xadd(
                        self.events_key,
                        {_FIELD: encode(event)},
                        maxlen=self.maxlen,
                        approximate=True,
                    )
                await pipe.execute()
        except (RedisError, OSError) as err:
            self._last_id = None
            raise StateUnavailable(f"redis publish failed: {err!r}") from err

    async def read(self, timeout_s: float) -> Sequence[Event]:
        client = self._redis()
        try:
            if self._last_id is None:
                last: Any = await client.xrevrange(self.events_key, "+", "-", count=1)
                self._last_id = last[0][0] if last else b"0-0"
            reply: Any = await client.xread(
                {self.events_key: self._last_id},
                count=self.batch,
                block=max(1, int(min(timeout_s, _MAX_BLOCK_S) * 1000)),
            )
        except (RedisError, OSError) as err:
            self._last_id = None
            raise StateUnavailable(f"redis read failed: {err!r}") from err
        out: list[Event] = []
        for _key, entries in reply or ():
            for entry_id, fields in entries:
                self._last_id = entry_id
                data = fields.get(_FIELD)
                try:
                    if not isinstance(data, bytes):
                        raise EventError("entry has no event field")
                    event = decode(data)
                except IncompatibleReplicaError as err:
                    # not noise: a replica whose prefixes can never match ours
                    self._mismatched += 1
                    if self._mismatched % 1000 == 1:
                        log.error("refusing state events (%d so far): %s", self._mismatched, err)
                    continue
                except EventError as err:
                    self._malformed += 1
                    if self._malformed == 1:
                        log.warning("skipping malformed state event %r: %s", entry_id, err)
                    continue
                if event.replica != self._replica:
                    out.append(event)
        return out

    async def heartbeat(self, ttl_s: float) -> None:
        try:
            await self._redis().set(
                self._replica_prefix + self._replica,
                self._replica,
                px=max(1, int(ttl_s * 1000)),
            )
        except (RedisError, OSError) as err:
            raise StateUnavailable(f"redis heartbeat failed: {err!r}") from err

    async def replicas(self) -> Sequence[str]:
        found: set[str] = set()
        try:
            async for key in self._redis().scan_iter(match=self._replica_prefix + "*", count=100):
                name = key.decode() if isinstance(key, bytes) else str(key)
                found.add(name[len(self._replica_prefix) :])
        except (RedisError, OSError) as err:
            raise StateUnavailable(f"redis replica listing failed: {err!r}") from err
        return sorted(found)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):  # else the key expires on its own
                await client.delete(self._replica_prefix + self._replica)
            await client.aclose()
