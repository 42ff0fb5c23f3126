"""Async step functions: a batch's calls run concurrently, a bounded number at a time.

``map``, ``filter``, ``flat_map`` and ``peek`` take an ``async def`` (an HTTP call, a database
lookup). Their operators stay synchronous: :class:`Concurrent` is what they call instead of
:func:`~operators.base.call_each`, with the same contract. It runs one coroutine per batch on
the process's step loop (:mod:`operators.steploop`) and waits for it: at most ``limit`` calls
are in flight at once (the batch's values are shared out to ``limit`` coroutines that each await
one call after the other), each bounded to ``timeout`` seconds. The results keep the order of
the values whatever the order the calls finish in. A call that raises fails its record alone:
the others complete, then the failures are reported through the step context in the order of
the batch, from the worker's thread, like those of a plain function.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from operators.base import StepContext, reject_call
from operators.steploop import step_loop
from pipelines.batch import Batch
from pipelines.errors import StepTimeout

__all__ = ["DEFAULT_CONCURRENCY", "Concurrent", "listed"]

DEFAULT_CONCURRENCY = 100
"""Calls of an async step function in flight at once, unless its step says otherwise."""


@dataclass(frozen=True, slots=True)
class Concurrent:
    """How an async step function is called: at most ``limit`` calls at once within a batch,
    each cancelled after ``timeout`` seconds (if given) and failed with
    :class:`~pipelines.errors.StepTimeout`."""

    limit: int = DEFAULT_CONCURRENCY
    timeout: float | None = None

    def __call__(
        self,
        ctx: StepContext,
        fn: Callable[[Any], Any],
        batch: Batch,
        items: Sequence[Any] | None = None,
        *,
        name: str | None = None,
    ) -> tuple[list[Any], set[int]]:
        """As :func:`~operators.base.call_each`, for an async ``fn``."""
        values = batch.values if items is None else items
        results, errors = step_loop.run(self._call_all(fn, values))
        for index in sorted(errors):
            reject_call(ctx, fn, errors[index], batch, index, name=name)
        return results, set(errors)

    async def _call_all(
        self, fn: Callable[[Any], Any], values: Sequence[Any]
    ) -> tuple[list[Any], dict[int, Exception]]:
        """``fn``'s result for each value (``None`` where it raised), and what it raised."""
        results: list[Any] = [None] * len(values)
        errors: dict[int, Exception] = {}
        pending = enumerate(values)  # shared: each value goes to the first caller free

        async def caller() -> None:
            for index, value in pending:
                try:
                    results[index] = await self._bounded(fn(value))
                except Exception as error:  # any user error: routed by the step's policy
                    errors[index] = error

        await asyncio.gather(*(caller() for _ in range(min(self.limit, len(values)))))
        return results, errors

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        if self.timeout is None:
            return await call
        scope = asyncio.timeout(self.timeout)
        try:
            async with scope:
                return await call
        except TimeoutError:
            if not scope.expired():
                raise  # the function's own (a client's timeout): its error, not the step's
            raise StepTimeout(self.timeout) from None


async def listed(fn: Callable[[Any], Any], value: Any) -> list[Any]:
    """The items of what an async ``flat_map`` function gives for ``value``: the values of an
    async generator, or of the iterable a coroutine returns."""
    result = fn(value)
    if isinstance(result, AsyncIterable):
        return [item async for item in result]
    return list(await result)
