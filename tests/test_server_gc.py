"""`settle_gc`: what startup built leaves the collector's view, young collections spaced out,
and cyclic garbage is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from router.server.embedded import GC_YOUNG_THRESHOLD, settle_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_gc_freezes_startup_and_still_collects_cycles(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    settle_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *older)
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
