"""Token ids -> chained 64-bit block hashes, the keys of the prefix index.

A prompt's tokens are cut into blocks of `block_tokens` (default 64); the last block may be
partial and its hash covers exactly the tokens it has. Block k's hash is computed over
(block k-1's hash, block k's tokens), so::

    hash at depth k equal  <=>  the whole prefix up to and including block k is equal

(up to 64-bit collisions). Block 0 chains on a seed derived from the salt (model name, LoRA,
cache salt) and the tokenizer, so equal text under two models, or two tokenizations, never
matches.

The hash function is CPython's tuple hash (xxHash-derived since 3.8) over ``(parent, block)``:
for tuples of ints it is deterministic across processes and hosts (int hashing is not
randomised by PYTHONHASHSEED), and it runs about twice as fast as one ``blake2b`` call per
block, which is where decision time goes for long prompts. It is not cryptographic: a client
able to craft collisions could only mislead routing, never another tenant's output. Replicas
sharing an index (redis) must hash alike: their state events carry `HASH_SCHEME` (the code's
`HASH_VERSION` and one probe hash computed at import, which a CPython with another tuple
hash would change), and a replica refuses, loudly, events hashed under another scheme.

`BlockHasher` is the text path: segments are tokenized through a `SegmentTokenCache`, and the
chain state (full-block hashes plus the partial tail's tokens) is remembered per message
prefix, so turn N+1 of a conversation tokenizes and hashes only the messages added since
turn N (states are keyed by the prefix's message lengths and last message, and verified
against the stored messages, so finding one never hashes the whole conversation's text)::

    turn N    | sys | u1 | a1 | u2 |                     state cached at the end
    turn N+1  | sys | u1 | a1 | u2 | a2 | u3 |           resume from turn N's state
                                   |<-- new -->|          only these are tokenized and hashed

Text prompts (completions, /generate) arrive as position-based chunks (`prompt.py`), and a
longer prompt repeats an earlier one's chunks except its last, never the whole tuple. So for
them a second state is saved at ``segments[:-1]`` (the last chunk is the one that grows), and
the resume search goes down to the first segment instead of `_RESUME_DEPTH` (a turn may add
many chunks). Chat prompts keep one state per request and their hashes are unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final, NamedTuple

from router.core.chat_template import ChatTemplate, ChatTemplateError
from router.core.model import RouteRequest
from router.core.prompt import Prompt
from router.core.tokens import SegmentTokenCache, Tokenizer

__all__ = [
    "HASH_SCHEME",
    "HASH_VERSION",
    "BlockHasher",
    "chain_hashes",
    "route_request_from_hash_ids",
    "salt_seed",
]

_MASK64 = (1 << 64) - 1
# how many message-prefix lengths (from the full list down) to try when resuming a chain:
# a conversation's next turn usually appends one to a few messages (assistant, tool, user).
_RESUME_DEPTH = 8

# A chain state's key: (seed, the prefix's segment lengths, its last segment). Hashing it reads
# one message, not the whole conversation (hashing ~60 KB of fresh strings per request was ~20
# us); a key match is confirmed by comparing the stored segments (memcmp, ~4x faster than
# hashing). Two prefixes sharing a key just replace each other's state.
_StateKey = tuple[int, tuple[int, ...], str]


def salt_seed(salt: str) -> int:
    """A stable 64-bit seed for a salt string (blake2b: stable across processes and hosts)."""
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")


def chain_hashes(token_ids: Sequence[int], block_tokens: int, seed: int = 0) -> tuple[int, ...]:
    """One 64-bit hash per block (the last may be partial), each chained on its parent's."""
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    return tuple(_chain(token_ids, block_tokens, seed & _MASK64))


def _chain(token_ids: Sequence[int], block_tokens: int, parent: int) -> list[int]:
    ids = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
    out: list[int] = []
    append = out.append
    for i in range(0, len(ids), block_tokens):
        parent = hash((parent, ids[i : i + block_tokens])) & _MASK64
        append(parent)
    return out


# Bump when chain_hashes changes on purpose; tests pin its outputs for this version.
HASH_VERSION: Final = 1
# version and a probe: replicas whose hashes differ (another tuple hash) see different schemes
HASH_SCHEME: Final = f"{HASH_VERSION}-{chain_hashes(range(8), 4, seed=7)[-1]:016x}"


def route_request_from_hash_ids(
    rid: str,
    hash_ids: Sequence[int],
    block_tokens: int,
    prompt_tokens: int,
    max_tokens: int | None,
    session_key: str | None = None,
) -> RouteRequest:
    """A trace request whose ``hash_ids`` (Mooncake: chained 512-token block ids) are the blocks."""
    return RouteRequest(
        rid=rid,
        blocks=tuple(hash_ids),
        block_tokens=block_tokens,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        session_key=session_key,
    )


class _ChainState(NamedTuple):
    """The chain after a message prefix: hashes of its full blocks and the partial tail.

    A named tuple, not a frozen dataclass: one is built per request, and this builds in half
    the time (~1 us here).
    """

    segments: tuple[str, ...]  # the message prefix itself: a key match is verified on it
    full_blocks: tuple[int, ...]
    tail: tuple[int, ...]  # tokens after the last full block (fewer than block_tokens)
    tokens: int


class BlockHasher:
    """Prompt -> `RouteRequest`, tokenizing and hashing only what earlier turns did not."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        block_tokens: int = 64,
        cache_entries: int = 65536,
        *,
        state_entries: int = 4096,
        state_blocks: int = 1_000_000,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        if block_tokens <= 0:
            raise ValueError("block_tokens must be positive")
        if state_entries <= 0 or state_blocks <= 0:
            raise ValueError("state_entries and state_blocks must be positive")
        self.tokenizer = tokenizer
        self.block_tokens = block_tokens
        # chat requests rendered as the engine renders them (exact pages for KV events)
        self.chat_template = chat_template
        self.templated = 0  # chat requests hashed through the chat template
        self.segments = SegmentTokenCache(tokenizer, max_entries=cache_entries)
        self.state_entries = state_entries
        self.state_blocks = state_blocks
        self._state_block_count = 0
        self._states: OrderedDict[_StateKey, _ChainState] = OrderedDict()
        self._seeds: dict[str, int] = {}
        self.resumed = 0  # requests that continued a cached message-prefix chain
        self.fresh = 0  # requests hashed from their first message

    def text_seed(self, salt: str) -> int:
        """The chain seed of text prompts under `salt` (the tokenizer is part of it)."""
        seed = self._seeds.get(salt)
        if seed is None:
            if len(self._seeds) > 4096:
                self._seeds.clear()
            seed = salt_seed(f"text\x1f{self.tokenizer.name}\x1f{self.block_tokens}\x1f{salt}")
            self._seeds[salt] = seed
        return seed

    def ids_seed(self, salt: str) -> int:
        """The chain seed of token-id prompts under `salt` (no tokenizer involved)."""
        return salt_seed(f"ids\x1f{self.block_tokens}\x1f{salt}")

    def route_request(
        self, prompt: Prompt, rid: str, *, first_token_seen: bool = True
    ) -> RouteRequest:
        """The request the routing core sees: blocks, sizes, max_tokens, session key."""
        if prompt.input_ids is not None:
            seed = self.ids_seed(prompt.salt)
            blocks = chain_hashes(prompt.input_ids, self.block_tokens, seed)
            n = len(prompt.input_ids)
        elif self.chat_template is not None and prompt.chat is not None:
            blocks, n = self._templated_blocks(prompt)
        else:
            blocks, n = self._text_blocks(prompt)
        return RouteRequest(
            rid=rid,
            blocks=blocks,
            block_tokens=self.block_tokens,
            prompt_tokens=n,
            max_tokens=prompt.max_tokens,
            session_key=prompt.session_key,
            first_token_seen=first_token_seen,
        )

    def _templated_blocks(self, prompt: Prompt) -> tuple[tuple[int, ...], int]:
        """A chat rendered by the model's template and tokenized whole, as SGLang does.

        No per-message reuse here: the template may join messages in ways segments cannot
        see. A conversation the template cannot render falls back to the segment blocks.
        """
        assert self.chat_template is not None and prompt.chat is not None
        messages, tools = prompt.chat
        try:
            text = self.chat_template.render(messages, tools)
        except ChatTemplateError:
            return self._text_blocks(prompt)
        ids = self.tokenizer.encode(text)
        self.templated += 1
        return chain_hashes(ids, self.block_tokens, self.text_seed(prompt.salt)), len(ids)

    def _text_blocks(self, prompt: Prompt) -> tuple[tuple[int, ...], int]:
        seed = self.text_seed(prompt.salt)
        segs = prompt.segments
        bt = self.block_tokens
        states = self._states
        lengths = tuple(map(len, segs))
        start = 0
        state: _ChainState | None = None
        chat = prompt.kind == "chat"
        lowest = max(0, len(segs) - _RESUME_DEPTH) if chat else 0
        for i in range(len(segs), lowest, -1):
            probe = (seed, lengths[:i], segs[i - 1])
            state = states.get(probe)
            if state is not None:
                if state.segments == segs[:i]:
                    states.move_to_end(probe)
                    start = i
                    break
                state = None  # another prefix with the same lengths and last message
        if state is None:
            self.fresh += 1
            full_blocks: tuple[int, ...] = ()
            head: tuple[int, ...] = ()
            count = 0
            parent = seed
        else:
            self.resumed += 1
            full_blocks = state.full_blocks
            head = state.tail
            count = state.tokens - len(head)
            parent = full_blocks[-1] if full_blocks else seed
        if start == len(segs):
            assert state is not None
            blocks = full_blocks + tuple(_chain(head, bt, parent)) if head else full_blocks
            return blocks, state.tokens
        encode = self.segments.encode
        last = len(segs) - 1
        if start < last:
            head += tuple(itertools.chain.from_iterable(map(encode, segs[start:last])))
        # One tuple of the tokens to hash (a chat turn: the tail + the new message), built by
        # one concatenation; `_chain` and the saved tails slice it without copying it again.
        tokens = head + encode(segs[last])
        new = _chain(tokens, bt, parent)
        n = count + len(tokens)
        # The state keeps the resumed prefix's own strings, not this request's equal copies:
        # a conversation's earlier messages are then stored once, and this request's copies
        # (fresh from parsing, ~60 KB for a 20-message chat) are freed when it ends, so the
        # next parse reuses their memory instead of faulting in new pages (that was ~35 us of
        # a 20-message parse, 13 page faults).
        if state is not None:
            segs = state.segments + segs[start:]
        if not chat and start < last:  # the next, longer text resumes after its last chunk
            self._save(seed, lengths[:last], segs[:last], full_blocks, new, head)
        self._save(seed, lengths, segs, full_blocks, new, tokens)
        return full_blocks + tuple(new), n

    def _save(
        self,
        seed: int,
        lengths: tuple[int, ...],
        segs: tuple[str, ...],
        resumed_blocks: tuple[int, ...],
        new: list[int],
        tokens: tuple[int, ...],
    ) -> None:
        """Remember the chain after `segs`: `tokens` (a prefix of what `new` hashes) resumed."""
        bt = self.block_tokens
        states = self._states
        whole = len(tokens) // bt
        key = (seed, lengths, segs[-1])
        old = states.pop(key, None)
        if old is not None:
            self._state_block_count -= len(old.full_blocks)
        kept = resumed_blocks + tuple(new[:whole])
        count = len(resumed_blocks) * bt + len(tokens)
        states[key] = _ChainState(
            segments=segs, full_blocks=kept, tail=tokens[whole * bt :], tokens=count
        )
        self._state_block_count += len(kept)
        while len(states) > self.state_entries or self._state_block_count > self.state_blocks:
            _, dropped = states.popitem(last=False)
            self._state_block_count -= len(dropped.full_blocks)
