"""KV events in `serve`: one subscriber per backend that publishes them, driving its index.

On each discovery of a backend (`BackendPool` observers), if its `/server_info` advertises a
publisher (`kv_events`) and the router can read its blocks, the manager subscribes
(`backends.sglang_kv`) and switches that backend's index entries to event-driven
(`router.core.kv_mirror.EventMirror`). Reading the engine's blocks needs the model's own
tokenizer (`--tokenizer PATH`) and `--block-tokens` equal to the backend's page size; without
them, or with `--kv-events off`, or a policy without a prefix index, today's modelled cache
stays, and `/stats` says why under "kv_events". A publisher can also be given by hand
(`--kv-events-endpoint URL=tcp://host:port`, for a server whose `/server_info` does not
advertise one): every topic, at the server's page size.

Sequence numbers, per backend:

- the first batch seen (any number: SGLang's warm-up is published before a router can
  connect): events from here on; pages stored earlier are unknown and count as orphans;
- a gap (batches lost): the event-driven entries are dropped and the backend falls back to the
  modelled LRU, since what was lost may have evicted anything; events take over again at the
  next `AllBlocksCleared` or when the publisher starts over;
- the publisher's connection dropping (the server died) or numbers going back (a restarted
  server, whose cache started empty): event-driven again, from empty, so a restarted backend
  rejoins with its old entries forgotten.

Each router replica subscribes for itself; nothing here is shared through `router.state`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from backends.sglang import KVEventsInfo, ServerInfo
from backends.sglang_kv import KVBatch, KVEventSubscriber, Verdict
from router.core.blocks import BlockHasher
from router.core.index import PrefixIndex
from router.core.kv_mirror import EventMirror, KVCleared
from router.core.model import Policy
from router.core.tokens import HFTokenizer

__all__ = ["KVEventsManager", "KVEventsMode"]

log = logging.getLogger(__name__)

KVEventsMode = Literal["auto", "off"]


@dataclass
class _Backend:
    url: str
    mirror: EventMirror
    subscriber: KVEventSubscriber
    events: bool = False  # event-driven now (else modelled, after a gap)
    gaps: int = 0
    restarts: int = 0
    fallbacks: int = 0
    endpoints: list[str] = field(default_factory=list)


class KVEventsManager:
    """Subscriptions of one router process; a `BackendPool` observer."""

    def __init__(
        self,
        policy: Policy,
        hasher: BlockHasher | None,
        mode: KVEventsMode,
        endpoints: Mapping[str, str] | None = None,
    ) -> None:
        self.mode = mode
        self.endpoints = dict(endpoints or {})  # backend URL -> tcp://host:port, by hand
        self.hasher = hasher
        index = getattr(policy, "index", None)
        self.index = index if isinstance(index, PrefixIndex) else None
        self._backends: dict[str, _Backend] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self.skipped: dict[str, str] = {}  # backend -> why it stays modelled

    # -- pool observer ------------------------------------------------------------------------
    def discovered(self, backend_id: str, url: str, server: ServerInfo) -> None:
        """(Re)start the backend's subscription after discovery (the index forgot its mode)."""
        self._drop(backend_id)
        given = self.endpoints.get(url.rstrip("/"))
        if given is not None:  # --kv-events-endpoint: every topic, the server's page size
            host, _, port = given[len("tcp://") :].rpartition(":")
            kv = KVEventsInfo(host=host.strip("[]") or None, port_base=int(port), topic="",
                              block_size=server.page_size)  # fmt: skip
            server = dataclasses.replace(server, kv_events=kv)
        reason = self._unusable(server)
        if reason is not None:
            self.skipped[backend_id] = reason
            if server.kv_events is not None and self.mode != "off":
                log.info("backend %s: KV events not used: %s", url, reason)
            return
        assert server.kv_events is not None and self.hasher is not None and self.index
        self.skipped.pop(backend_id, None)
        hasher = self.hasher
        salts = ["", server.model, *([server.model_path] if server.model_path else [])]
        seeds = [s for salt in dict.fromkeys(salts) for s in (hasher.text_seed(salt),
                                                              hasher.ids_seed(salt))]  # fmt: skip
        mirror = EventMirror(self.index, backend_id, seeds=seeds, block_tokens=hasher.block_tokens)
        endpoints = server.kv_events.endpoints(url)

        def on_batch(batch: KVBatch, verdict: Verdict) -> None:
            self._on_batch(backend_id, batch, verdict)

        def on_disconnect() -> None:
            self._on_disconnect(backend_id)

        sub = KVEventSubscriber(endpoints, server.kv_events.topic, on_batch, on_disconnect)
        self._backends[backend_id] = _Backend(
            url=url, mirror=mirror, subscriber=sub, endpoints=endpoints, events=True
        )
        mirror.start()  # from now on only events fill this backend's entries
        sub.start()
        log.info("backend %s: subscribed to KV events at %s", url, ", ".join(endpoints))

    def removed(self, backend_id: str) -> None:
        self._drop(backend_id)
        self.skipped.pop(backend_id, None)

    async def stop(self) -> None:
        for be in list(self._backends.values()):
            await be.subscriber.stop()
        self._backends.clear()
        if self._stopping:
            await asyncio.wait(set(self._stopping))

    # -- events -------------------------------------------------------------------------------
    def _unusable(self, server: ServerInfo) -> str | None:
        if self.mode == "off":
            return "--kv-events off"
        if server.kv_events is None:
            return "the backend publishes no KV events (--kv-events-config)"
        if self.index is None or self.hasher is None:
            return "the routing policy keeps no prefix index"
        if not isinstance(self.hasher.tokenizer, HFTokenizer):
            return "needs the model's tokenizer (--tokenizer PATH)"
        if self.hasher.block_tokens != server.kv_events.block_size:
            return (
                f"--block-tokens {self.hasher.block_tokens} differs from the backend's "
                f"page size {server.kv_events.block_size}"
            )
        return None

    def _drop(self, backend_id: str) -> None:
        be = self._backends.pop(backend_id, None)
        if be is not None:
            task = asyncio.get_running_loop().create_task(be.subscriber.stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _on_disconnect(self, backend_id: str) -> None:
        be = self._backends.get(backend_id)
        if be is None or self.index is None or backend_id not in self.index.backends():
            return
        be.mirror.start()  # whatever the server held is gone with it (or unknown): forget it
        be.events = True
        log.info("backend %s: KV event publisher disconnected: entries dropped", be.url)

    def _on_batch(self, backend_id: str, batch: KVBatch, verdict: Verdict) -> None:
        be = self._backends.get(backend_id)
        if be is None or self.index is None or backend_id not in self.index.backends():
            return
        mirror = be.mirror
        events = batch.events
        if verdict in ("first", "restart"):
            if verdict == "restart":
                be.restarts += 1
                log.info("backend %s: KV event publisher restarted: entries dropped", be.url)
            mirror.start()
            be.events = True
        elif verdict == "gap":
            be.gaps += 1
            if be.events:
                be.fallbacks += 1
                be.events = False
                mirror.stop()
                log.warning(
                    "backend %s: KV event batches lost before %d: modelled cache until the "
                    "next flush or publisher restart",
                    be.url,
                    batch.seq,
                )
        if not be.events:
            # events resume exactly after the backend cleared its cache
            last_clear = max((i for i, e in enumerate(events) if isinstance(e, KVCleared)),
                             default=-1)  # fmt: skip
            if last_clear < 0:
                return
            mirror.start()
            be.events = True
            events = events[last_clear + 1 :]
        now = asyncio.get_running_loop().time()
        for event in events:
            mirror.apply(event, now)

    # -- /stats -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "backends": {}}
        for backend_id, be in self._backends.items():
            m = be.mirror
            held = (
                self.index.held_blocks(backend_id)
                if self.index is not None and backend_id in self.index.backends()
                else 0
            )
            out["backends"][backend_id] = {
                "source": "events" if be.events else "modelled",
                "endpoints": be.endpoints,
                "batches": be.subscriber.batches,
                "disconnects": be.subscriber.disconnects,
                "bad_batches": be.subscriber.bad_batches,
                "gaps": be.gaps,
                "restarts": be.restarts,
                "fallbacks": be.fallbacks,
                "stored_pages": m.stored_pages,
                "removed_pages": m.removed_pages,
                "orphan_pages": m.orphan_pages,
                "skipped_pages": m.skipped_pages,
                "index_entries": held,
            }
        for backend_id, reason in self.skipped.items():
            out["backends"][backend_id] = {"source": "modelled", "reason": reason}
        return out
