"""``async def`` functions in map, filter, flat_map and peek: a batch's calls run concurrently,
a bounded number at a time, on the process's step loop, and come out in input order."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.cli import headwater
from support.values import from_values

from connectors.memory import Collect
from operators.concurrent import Concurrent
from operators.stateless import Map
from operators.steploop import THREAD_NAME, step_loop
from pipelines.errors import ErrorPolicy, PipelineDefinitionError, StepError, StepTimeout
from pipelines.log.memory import MemoryLog
from pipelines.runtime.inprocess import run_in_process
from pipelines.runtime.topology import compile_pipeline
from pipelines.serde import Json
from pipelines.steps import SinkStep
from pipelines.testing import OperatorHarness, run_pipeline

VALUES = list(range(250))


async def jitter() -> None:
    """A few milliseconds at random, so calls finish in another order than they started."""
    await asyncio.sleep(random.random() / 200)


def step_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every test ends with the step loop closed: a run leaves no thread behind."""
    before = set(threading.enumerate())
    yield
    assert step_threads() == []
    assert set(threading.enumerate()) <= before


# -- results ---------------------------------------------------------------------------------------


def test_an_async_map_gives_what_the_plain_one_gives_in_input_order() -> None:
    async def describe(n: int) -> dict[str, int]:
        await jitter()
        return {"n": n, "square": n * n}

    pipeline = from_values(VALUES).map("describe", describe).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == [{"n": n, "square": n * n} for n in VALUES]


def test_an_async_filter_keeps_what_the_plain_one_keeps_in_input_order() -> None:
    async def odd(n: int) -> bool:
        await jitter()
        return n % 2 == 1

    pipeline = from_values(VALUES).filter("odd", odd).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == [n for n in VALUES if n % 2 == 1]


async def repeat(n: int) -> list[int]:
    await jitter()
    return [n] * (n % 3)


async def repeating(n: int) -> AsyncIterator[int]:
    for _ in range(n % 3):
        await jitter()
        yield n


@pytest.mark.parametrize("fn", [repeat, repeating], ids=["returns a list", "async generator"])
def test_an_async_flat_map_gives_what_the_plain_one_gives_in_input_order(fn: Any) -> None:
    pipeline = from_values(VALUES).flat_map("repeat", fn).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == [n for n in VALUES for _ in range(n % 3)]


def test_an_async_peek_sees_every_value_once_and_passes_them_on() -> None:
    seen: Counter[int] = Counter()

    async def look(n: int) -> None:
        await jitter()
        seen[n] += 1

    pipeline = from_values(VALUES).peek("look", look).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == VALUES
    assert seen == Counter(VALUES)


def test_async_and_plain_steps_chain() -> None:
    async def halve(n: int) -> float:
        await jitter()
        return n / 2

    pipeline = (
        from_values(VALUES)
        .map("halve", halve)
        .filter("whole", lambda x: x == int(x))
        .map("back", lambda x: int(x) * 2)
        .sink(Collect(), step_id="out")
    )
    assert run_pipeline(pipeline).values("out") == [n for n in VALUES if n % 2 == 0]


# -- concurrency -----------------------------------------------------------------------------------


class InFlight:
    """Counts the calls running at once."""

    def __init__(self) -> None:
        self.now = self.most = 0

    async def __call__(self, value: Any) -> Any:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.01)
            return value
        finally:
            self.now -= 1


@pytest.fixture
def held_loop() -> Iterator[None]:
    """The step loop, held as a worker holds it."""
    step_loop.hold()
    yield
    step_loop.release()


@pytest.mark.usefixtures("held_loop")
@pytest.mark.parametrize("limit", [1, 7, 100])
def test_calls_in_flight_never_exceed_the_bound_and_reach_it(limit: int) -> None:
    calls = InFlight()
    harness = OperatorHarness(Map("m", calls, concurrent=Concurrent(limit)))
    values = list(range(limit * 3 + 1))
    assert harness.send(values).values == values
    assert calls.most == limit


@pytest.mark.usefixtures("held_loop")
def test_calls_overlap() -> None:
    async def slow(n: int) -> int:
        await asyncio.sleep(0.05)
        return n

    harness = OperatorHarness(Map("m", slow, concurrent=Concurrent(100)))
    started = time.monotonic()
    assert harness.send(range(100)).values == list(range(100))
    assert time.monotonic() - started < 1.0  # 100 x 50 ms one after the other: 5 s


def test_the_bound_holds_in_a_run() -> None:
    calls = InFlight()
    pipeline = from_values(VALUES).map("m", calls, concurrency=5).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == VALUES
    assert calls.most == 5


def test_a_run_of_slow_calls_takes_about_one_call_per_batch() -> None:
    async def slow(n: int) -> int:
        await asyncio.sleep(0.05)
        return n

    values = list(range(100))
    pipeline = from_values(values).map("slow", slow).sink(Collect(), step_id="out")
    started = time.monotonic()
    assert run_pipeline(pipeline).values("out") == values
    assert time.monotonic() - started < 2.5  # 5 s one after the other


# -- failures --------------------------------------------------------------------------------------


def failing_on_fives(calls: Counter[int]) -> Any:
    async def parse(n: int) -> int:
        calls[n] += 1
        await jitter()
        if n % 5 == 0:
            raise ValueError(f"no fives: {n}")
        return n

    return parse


def test_a_failing_call_is_dead_lettered_and_the_rest_of_the_batch_goes_through() -> None:
    calls: Counter[int] = Counter()
    pipeline = (
        from_values(VALUES).map("parse", failing_on_fives(calls)).sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.values("out") == [n for n in VALUES if n % 5]
    assert calls == Counter(VALUES)  # each once
    letters = result.dead_letters
    assert [Json().deserialize(r.value) for r in letters] == [n for n in VALUES if n % 5 == 0]
    headers = dict(letters[1].headers)
    assert headers["headwater.step"] == b"parse"
    assert headers["headwater.error.type"] == b"ValueError"
    error = headers["headwater.error"].decode()
    assert "parse (" in error
    assert "raised ValueError: no fives: 5 at " in error
    assert f"{Path(__file__).name}:" in error  # where the user function raised


def test_failing_calls_are_skipped_under_skip() -> None:
    pipeline = (
        from_values(VALUES, error_policy=ErrorPolicy.SKIP)
        .filter("parse", failing_on_fives(Counter()))
        .sink(Collect(), step_id="out")
    )
    result = run_pipeline(pipeline)
    assert result.values("out") == [n for n in VALUES if n % 5]
    assert result.dead_letters == []


def test_under_fail_the_first_failure_stops_the_run_after_the_batch_completed() -> None:
    calls: Counter[int] = Counter()
    pipeline = (
        from_values(list(range(1, 10)), error_policy=ErrorPolicy.FAIL)
        .peek("parse", failing_on_fives(calls))
        .sink(Collect(), step_id="out")
    )
    with pytest.raises(StepError) as caught:
        run_pipeline(pipeline)
    assert caught.value.step == "parse"
    assert isinstance(caught.value.__cause__, ValueError)
    assert calls == Counter(range(1, 10))  # the other calls of the batch were not cut short


def test_a_call_that_runs_over_its_timeout_is_routed_as_a_step_timeout() -> None:
    async def lookup(n: int) -> int:
        await asyncio.sleep(5 if n % 50 == 0 else 0)
        return n

    pipeline = from_values(VALUES).map("lookup", lookup, timeout=0.2).sink(Collect(), step_id="out")
    started = time.monotonic()
    result = run_pipeline(pipeline)
    assert time.monotonic() - started < 4  # the five slow calls were cancelled, together
    assert result.values("out") == [n for n in VALUES if n % 50]
    letters = result.dead_letters
    assert [Json().deserialize(r.value) for r in letters] == [0, 50, 100, 150, 200]
    headers = dict(letters[0].headers)
    assert headers["headwater.error.type"] == StepTimeout.__name__.encode()
    assert b"did not return within 0.2 s" in headers["headwater.error"]


def test_a_timeout_of_the_function_itself_is_its_own_error() -> None:
    async def lookup(n: int) -> int:
        raise TimeoutError("the service did not answer")

    pipeline = from_values([1]).map("lookup", lookup, timeout=1).sink(Collect(), step_id="out")
    (letter,) = run_pipeline(pipeline).dead_letters
    headers = dict(letter.headers)
    assert headers["headwater.error.type"] == b"TimeoutError"
    assert b"the service did not answer" in headers["headwater.error"]


def test_timeouts_of_async_functions_need_no_main_thread() -> None:
    """Timers only interrupt the main thread; an async call is cancelled on its loop."""

    async def stuck(n: int) -> int:
        await asyncio.sleep(5)
        return n

    pipeline = from_values([1, 2]).map("stuck", stuck, timeout=0.1).sink(Collect(), step_id="o")
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(run_pipeline(pipeline)))
    thread.start()
    thread.join(timeout=10)
    (result,) = results
    assert len(result.dead_letters) == 2


# -- the loop --------------------------------------------------------------------------------------


class Client:
    """Stands for an ``aiohttp.ClientSession``: bound to the loop it was created on."""

    created = 0

    def __init__(self) -> None:
        Client.created += 1
        self.loop = asyncio.get_running_loop()
        self.lock = asyncio.Lock()  # fails if used from another loop

    async def get(self, n: int) -> dict[str, Any]:
        assert asyncio.get_running_loop() is self.loop
        async with self.lock:
            await asyncio.sleep(0)
        return {"n": n, "thread": threading.current_thread().name}


async def test_a_client_created_in_the_first_call_serves_every_later_batch() -> None:
    client: list[Client] = []

    async def fetch(n: int) -> dict[str, Any]:
        if not client:
            client.append(Client())
        return await client[0].get(n)

    async def fetched_again(row: dict[str, Any]) -> bool:  # another step, the same client
        return bool(await client[0].get(row["n"]))

    Client.created = 0
    pipeline = (
        from_values(VALUES)
        .map("fetch", fetch, concurrency=10)
        .filter("again", fetched_again)
        .sink(Collect(), step_id="out")
    )
    step = pipeline.step("out")
    assert isinstance(step, SinkStep) and isinstance(step.sink, Collect)
    sink = step.sink
    run = await run_in_process(compile_pipeline(pipeline), MemoryLog(), max_batch=7)
    assert [v["n"] for v in sink.values] == VALUES
    assert {v["thread"] for v in sink.values} == {THREAD_NAME}
    assert Client.created == 1
    (report,) = run.reports.values()
    assert report.steps["fetch"][:2] == [len(VALUES), len(VALUES)]


def test_the_loop_closes_after_a_run_and_a_new_one_starts_for_the_next() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def note(n: int) -> int:
        loops.append(asyncio.get_running_loop())
        return n

    pipeline = from_values([1, 2]).map("note", note).sink(Collect(), step_id="out")
    run_pipeline(pipeline)
    assert step_threads() == []
    run_pipeline(pipeline)
    assert step_threads() == []
    first, second = loops[0], loops[-1]
    assert first.is_closed() and second.is_closed() and first is not second


def test_background_tasks_left_on_the_loop_are_cancelled_when_it_closes() -> None:
    cancelled: list[int] = []

    async def forever(n: int) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    tasks: set[asyncio.Task[None]] = set()

    async def start(n: int) -> int:
        tasks.add(asyncio.get_running_loop().create_task(forever(n)))
        return n

    pipeline = from_values([1, 2, 3]).map("start", start).sink(Collect(), step_id="out")
    assert run_pipeline(pipeline).values("out") == [1, 2, 3]
    assert sorted(cancelled) == [1, 2, 3]


class Interrupted(BaseException):
    """Stands for the watchdog's ``Abandoned``: raised in the stepping thread by a signal."""


def interrupt(signum: int, frame: Any) -> None:
    raise Interrupted


@pytest.mark.usefixtures("held_loop")
def test_a_step_interrupted_while_it_waits_cancels_the_calls_in_flight() -> None:
    """A worker told to stop while an async step is stuck abandons the batch (see
    pipelines.runtime.watchdog): the calls must not go on running on the loop."""
    cancelled = threading.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    previous = signal.signal(signal.SIGUSR2, interrupt)
    main = threading.get_ident()
    timer = threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGUSR2))
    try:
        timer.start()
        with pytest.raises(Interrupted):
            step_loop.run(stuck())
    finally:
        timer.join()
        signal.signal(signal.SIGUSR2, previous)
    assert cancelled.wait(5)


# -- definitions -----------------------------------------------------------------------------------


async def identity(n: int) -> int:
    return n


@pytest.mark.parametrize("method", ["map", "filter", "flat_map", "peek"])
def test_concurrency_on_a_plain_function_is_refused(method: str) -> None:
    with pytest.raises(PipelineDefinitionError) as refused:
        getattr(from_values([1]), method)("step", lambda n: [n], concurrency=4)
    message = str(refused.value)
    assert "step 'step'" in message
    assert "concurrency= is for async functions" in message
    assert "<lambda> (" in message


@pytest.mark.parametrize("concurrency", [0, -3, 2.5, True, "8"])
def test_concurrency_must_be_a_positive_int(concurrency: Any) -> None:
    with pytest.raises(PipelineDefinitionError, match="concurrency must be a positive whole"):
        from_values([1]).map("step", identity, concurrency=concurrency)


@pytest.mark.parametrize("timeout", [0, -1, True, "2"])
def test_the_timeout_of_an_async_function_is_checked_too(timeout: Any) -> None:
    with pytest.raises(PipelineDefinitionError, match="timeout must be a positive number"):
        from_values([1]).map("step", identity, timeout=timeout)


@pytest.mark.parametrize("method", ["map", "filter", "peek"])
def test_an_async_generator_is_refused_by_steps_that_await_a_result(method: str) -> None:
    with pytest.raises(PipelineDefinitionError) as refused:
        getattr(from_values([1]), method)("step", repeating)
    message = str(refused.value)
    assert "repeating (" in message
    assert "async generator function" in message
    assert "Only flat_map takes one" in message


def test_an_async_function_is_still_refused_by_steps_that_cannot_await_it() -> None:
    with pytest.raises(PipelineDefinitionError) as refused:
        from_values([1]).key_by("by", identity)
    message = str(refused.value)
    assert "identity (" in message and "is an async function" in message
    assert "map, filter, flat_map and peek take an async def" in message
    with pytest.raises(PipelineDefinitionError, match="is an async function"):
        from_values([1]).reduce("sum", identity)


# -- headwater run ---------------------------------------------------------------------------------


MODULE = """
import asyncio
import threading

import connectors
from pipelines import Pipeline, Topic


async def enrich(n):
    await asyncio.sleep(0.01)
    if n == 13:
        raise LookupError("unlucky")
    return {"n": n, "thread": threading.current_thread().name}


async def parts(row):
    for part in range(row["n"] % 2 + 1):
        yield {**row, "part": part}


pipeline = (
    Pipeline("numbers")
    .source(connectors.Iterable(list(range(40))), into=Topic("numbers"))
    .map("enrich", enrich, concurrency=8)
    .flat_map("parts", parts, timeout=5)
    .sink(connectors.JsonLinesSink("out/rows.jsonl", shape="value"), step_id="rows")
)
"""


def test_headwater_run_on_the_embedded_log(tmp_path: Path) -> None:
    (tmp_path / "enriching.py").write_text(MODULE)
    result = headwater("run", "enriching.py", "--data-dir", "log", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "enrich: 40 in, 39 out" in result.stderr
    rows = [orjson.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_bytes().split()]
    expected = [(n, part) for n in range(40) if n != 13 for part in range(n % 2 + 1)]
    assert [(r["n"], r["part"]) for r in rows] == expected
    assert {r["thread"] for r in rows} == {THREAD_NAME}
