"""The plan body cache: bounded, expiring, and single-flight on a miss."""

from __future__ import annotations

import asyncio

import pytest

from service.api.plans import ResponseCache


class CountingCompute:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    async def __call__(self) -> bytes:
        self.calls += 1
        await asyncio.sleep(0.05)  # long enough for every waiter to arrive while it runs
        if self.fail:
            raise LookupError("no such plan")
        return f"body {self.calls}".encode()


def test_concurrent_misses_share_one_computation():
    cache, compute = ResponseCache(), CountingCompute()

    async def main() -> list[bytes]:
        return await asyncio.gather(*(cache.get_or_compute("p", compute) for _ in range(200)))

    bodies = asyncio.run(main())
    assert compute.calls == 1
    assert set(bodies) == {b"body 1"}
    assert cache.get("p") == b"body 1"


def test_expired_entry_is_computed_again():
    cache, compute = ResponseCache(ttl_s=0.0), CountingCompute()
    asyncio.run(cache.get_or_compute("p", compute))
    assert cache.get("p") is None
    assert asyncio.run(cache.get_or_compute("p", compute)) == b"body 2"


def test_failure_reaches_every_waiter_and_is_not_cached():
    cache, compute = ResponseCache(), CountingCompute(fail=True)

    async def main() -> list[object]:
        return await asyncio.gather(*(cache.get_or_compute("p", compute) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert compute.calls == 1
    assert all(isinstance(r, LookupError) for r in results)
    compute.fail = False
    assert asyncio.run(cache.get_or_compute("p", compute)) == b"body 2"


def test_a_waiter_that_hangs_up_does_not_cancel_the_others():
    cache, compute = ResponseCache(), CountingCompute()

    async def main() -> bytes:
        first = asyncio.ensure_future(cache.get_or_compute("p", compute))
        second = asyncio.ensure_future(cache.get_or_compute("p", compute))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(main()) == b"body 1"
    assert compute.calls == 1


def test_entries_are_bounded():
    cache = ResponseCache(max_entries=2)
    for key in "abc":
        cache.put(key, key.encode())
    assert cache.get("a") is None and cache.get("c") == b"c"
