"""The ``headwater`` command line: every user error exits with status 2 and one paragraph that
says what to fix (never a traceback); ``headwater topics`` shows what a run left on the log."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import orjson
import pytest
from support.cli import TIMEOUT, assert_user_error, headwater, write_module

from pipelines.runtime.runlock import run_lock

GOOD_MODULE = """
import connectors
from pipelines import Pipeline, Topic

LETTERS = [{"letter": c, "n": i} for i, c in enumerate("abcdefghij" * 3)]


def key(value):
    return value["letter"] if isinstance(value, dict) else None


pipeline = (
    Pipeline("letters")
    .source(
        connectors.Iterable(LETTERS + [b"not json"], key=key),
        into=Topic("letters", partitions=3),
    )
    .map("upper", lambda v: {"letter": v["letter"].upper(), "n": v["n"]})
    .sink(connectors.LogTopic(Topic("upper", partitions=2)))
)
"""

LETTERS = [{"letter": c, "n": i} for i, c in enumerate("abcdefghij" * 3)]
END_OF_TIME = 1 << 62  # the mark of an end-of-time marker (pipelines.runtime.watermarks)
# A source that reads its input to the end writes one end-of-time marker (a record with no
# value) to every partition of its topic, so the topic's records on the log are what the source
# wrote plus one marker per partition: 31 records + 3 markers on "letters". Sink topics such as
# "upper" and the pipeline's own topics get no markers.
LETTERS_ON_THE_LOG = 31 + 3


# -- headwater run: loading the module -------------------------------------------------------


def test_missing_module_path(tmp_path: Path) -> None:
    result = headwater("run", "nowhere/pipeline.py", cwd=tmp_path)
    assert_user_error(
        result, "no pipeline module at nowhere/pipeline.py", "give the path of a Python file"
    )


def test_a_directory_instead_of_a_module(tmp_path: Path) -> None:
    (tmp_path / "pipelines_dir").mkdir()
    result = headwater("run", "pipelines_dir", cwd=tmp_path)
    assert_user_error(result, "pipelines_dir", "did you mean a .py file?")


def test_a_module_with_a_syntax_error(tmp_path: Path) -> None:
    write_module(
        tmp_path / "broken.py",
        """
        from pipelines import Pipeline

        pipeline = Pipeline("broken"
        def oops(:
            pass
        """,
    )
    result = headwater("run", "broken.py", cwd=tmp_path)
    assert_user_error(result, "importing broken.py failed", "SyntaxError", "line 5")


RAISES = """
import connectors
from pipelines import Pipeline, Topic

SETTINGS = {}


def setting(name):
    return SETTINGS[name]


pipeline = (
    Pipeline("raises")
    .source(connectors.Iterable([1]), into=Topic(setting("topic")))
    .sink(connectors.Stdout())
)
"""


@pytest.mark.parametrize("spelled", ["relative", "absolute"])
def test_a_module_that_raises_on_import(tmp_path: Path, spelled: str) -> None:
    module = write_module(tmp_path / "jobs" / "raises.py", RAISES)
    spec = "jobs/raises.py" if spelled == "relative" else str(module)
    result = headwater("run", spec, cwd=tmp_path)
    # the innermost line of the module that raised: `return SETTINGS[name]`
    assert_user_error(result, f"importing {spec} failed at line 9", "KeyError: 'topic'")


def test_a_module_that_imports_a_missing_package(tmp_path: Path) -> None:
    write_module(tmp_path / "needs.py", "import no_such_package_anywhere\n")
    result = headwater("run", "needs.py", cwd=tmp_path)
    assert_user_error(result, "ModuleNotFoundError", "no_such_package_anywhere")


@pytest.mark.parametrize("spec", ["jobs.letters", "jobs.letters:pipeline"])
def test_a_module_named_by_its_dotted_name(tmp_path: Path, spec: str) -> None:
    """A module name is imported from the working directory (or the installed packages), by
    the runner and by each of its workers."""
    write_module(tmp_path / "jobs" / "__init__.py", "")
    write_module(tmp_path / "jobs" / "letters.py", GOOD_MODULE)
    result = headwater("run", spec, "--workers", "2", "--data-dir", "log", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "headwater: letters finished" in result.stderr
    assert "upper: 30 in, 30 out" in result.stderr


def test_an_unknown_module_name(tmp_path: Path) -> None:
    result = headwater("run", "jobs.nowhere", cwd=tmp_path)
    assert_user_error(
        result,
        "no pipeline module at jobs.nowhere",
        "no module 'jobs' in the working directory or the installed packages",
    )


def test_a_module_name_whose_module_raises_on_import(tmp_path: Path) -> None:
    write_module(tmp_path / "jobs" / "__init__.py", "")
    write_module(tmp_path / "jobs" / "raises.py", RAISES)
    result = headwater("run", "jobs.raises", cwd=tmp_path)
    assert_user_error(result, "importing jobs.raises failed at line 9", "KeyError: 'topic'")


def test_version(tmp_path: Path) -> None:
    result = headwater("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"headwater {version('headwater')}"


def test_a_missing_attribute(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py:pipelin", cwd=tmp_path)
    assert_user_error(result, "has no attribute 'pipelin'", "its pipelines are: pipeline")


def test_an_attribute_that_is_not_a_pipeline(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py:LETTERS", cwd=tmp_path)
    assert_user_error(result, "letters.py:LETTERS is a list, not a Pipeline")


FACTORIES = """
from pipelines import Pipeline


def broken_factory():
    raise RuntimeError("the factory needs a config file")


def needs_an_argument(config):
    return Pipeline("x")
"""


@pytest.mark.parametrize(
    ("attribute", "needle"),
    [
        ("broken_factory", "the factory needs a config file"),
        ("needs_an_argument", "config"),
    ],
)
def test_an_attribute_whose_factory_fails(tmp_path: Path, attribute: str, needle: str) -> None:
    """``module.py:attribute`` may name a function returning the pipeline; when calling it
    fails, that is a user error like any other failure to load."""
    write_module(tmp_path / "factories.py", FACTORIES)
    result = headwater("run", f"factories.py:{attribute}", cwd=tmp_path)
    assert_user_error(result, attribute, needle)


def test_a_module_without_a_pipeline(tmp_path: Path) -> None:
    write_module(tmp_path / "empty.py", "from pipelines import Pipeline\nNAME = 'x'\n")
    result = headwater("run", "empty.py", cwd=tmp_path)
    assert_user_error(result, "empty.py defines no Pipeline", "pipeline = Pipeline(")


def test_a_module_with_several_pipelines(tmp_path: Path) -> None:
    write_module(
        tmp_path / "two.py",
        """
        import connectors
        from pipelines import Pipeline, Topic

        def make(name):
            source = connectors.Iterable([1])
            return Pipeline(name).source(source, into=Topic(name)).sink(connectors.Stdout())

        first = make("a")
        second = make("b")
        """,
    )
    result = headwater("run", "two.py", cwd=tmp_path)
    assert_user_error(result, "first, second", "two.py:<attribute>")


def test_a_module_with_an_invalid_pipeline(tmp_path: Path) -> None:
    write_module(
        tmp_path / "dup.py",
        """
        import connectors
        from pipelines import Pipeline, Topic

        pipeline = (
            Pipeline("dup")
            .source(connectors.Iterable([1, 2]), into=Topic("numbers"))
            .map("double", lambda n: 2 * n)
            .map("double", lambda n: 4 * n)
            .sink(connectors.Stdout())
        )
        """,
    )
    result = headwater("run", "dup.py", cwd=tmp_path)
    assert_user_error(result, "dup.py declares an invalid pipeline", "'double' is used twice")


# -- headwater run: options and inputs -------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_must_be_positive(tmp_path: Path, workers: str) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py", "--workers", workers, cwd=tmp_path)
    assert_user_error(result, f"--workers must be at least 1, not {workers}")
    assert not (tmp_path / ".headwater" / "topics" / "letters").exists()


JSONLINES = """
import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("lines")
    .source(connectors.JsonLines({path!r}), into=Topic("lines", partitions=2))
    .map("same", lambda v: v)
    .sink(connectors.Stdout())
)
"""


def _missing(tmp_path: Path) -> tuple[str, list[str]]:
    return "data/clicks.jsonl", ["no such file 'data/clicks.jsonl'", "fix the path"]


def _directory(tmp_path: Path) -> tuple[str, list[str]]:
    (tmp_path / "data").mkdir()
    return "data", ["'data' is a directory", "give the path of a file"]


def _no_permission(tmp_path: Path) -> tuple[str, list[str]]:
    path = tmp_path / "secret.jsonl"
    path.write_text('{"a": 1}\n')
    path.chmod(0)
    return "secret.jsonl", ["permission denied reading 'secret.jsonl'", "make it readable"]


UNREADABLE: list[Callable[[Path], tuple[str, list[str]]]] = [_missing, _directory]
if os.geteuid() != 0:  # root reads any file
    UNREADABLE.append(_no_permission)


@pytest.mark.parametrize("make", UNREADABLE, ids=lambda make: make.__name__.strip("_"))
@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_unreadable_input_file(
    tmp_path: Path, make: Callable[[Path], tuple[str, list[str]]], workers: str
) -> None:
    path, needles = make(tmp_path)
    write_module(tmp_path / "lines.py", JSONLINES.format(path=path))
    result = headwater("run", "lines.py", "--workers", workers, "--no-progress", cwd=tmp_path)
    assert_user_error(result, "JsonLines source", *needles, "step 'lines'")


def test_an_unreadable_input_file_with_progress_shown(tmp_path: Path) -> None:
    """With progress on (the default), the error is still one paragraph, and the last thing."""
    write_module(tmp_path / "lines.py", JSONLINES.format(path="missing.jsonl"))
    result = headwater("run", "lines.py", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("headwater: ") :]
    assert "\n\n" not in error.strip()
    assert "no such file 'missing.jsonl'" in " ".join(error.split())


def test_a_topic_redeclared_with_other_partitions(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    first = headwater("run", "letters.py", "--no-progress", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    write_module(tmp_path / "letters.py", GOOD_MODULE.replace("partitions=3", "partitions=4"))
    result = headwater("run", "letters.py", "--no-progress", cwd=tmp_path)
    assert_user_error(result, "topic 'letters' exists", "3 partitions, not 4")


# -- a good run, and headwater topics ----------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where ``headwater run letters.py`` has run to the end (default data dir)."""
    directory = tmp_path_factory.mktemp("cli-run")
    write_module(directory / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py", "--workers", "2", cwd=directory)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "headwater: letters finished" in result.stderr
    assert "source letters: 31 records written" in result.stderr
    assert "letters: 31 in, 30 out, 1 to dead letters" in result.stderr
    assert "lag: 0 records" in result.stderr
    return directory


def test_console_script(finished_run: Path) -> None:
    script = shutil.which("headwater") or str(Path(sys.executable).parent / "headwater")
    result = subprocess.run(
        [script, "topics", "list"],
        cwd=finished_run,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"letters\t3 partitions\t{LETTERS_ON_THE_LOG} records" in result.stdout


def test_topics_list(finished_run: Path) -> None:
    result = headwater("topics", "list", cwd=finished_run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"letters\t3 partitions\t{LETTERS_ON_THE_LOG} records",  # with the end-of-time markers
        "letters.dead-letters\t1 partitions\t1 records",
        # what each task knows of its inputs' progress, saved once per task here
        "letters.marks-0.changelog\t3 partitions\t3 records",
        "letters.source-positions\t1 partitions\t1 records",
        "upper\t2 partitions\t30 records",
    ]


def test_topics_data_dir_option(finished_run: Path, tmp_path: Path) -> None:
    """``--data-dir`` goes after the topics command, as for ``headwater run``."""
    data_dir = tmp_path / "elsewhere"
    shutil.copytree(finished_run / ".headwater", data_dir)
    result = headwater("topics", "describe", "upper", "--data-dir", data_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "upper: 2 partitions, compacted=False, retention none"
    listed = headwater("topics", "list", "--data-dir", data_dir, cwd=tmp_path)
    assert "upper\t2 partitions\t30 records" in listed.stdout.splitlines()


def test_topics_describe(finished_run: Path) -> None:
    result = headwater(
        "topics", "describe", "letters", "--data-dir", ".headwater", cwd=finished_run
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "letters: 3 partitions, compacted=False, retention none"
    counts = [int(line.split(":")[1].split()[0]) for line in lines[1:]]
    for line, count in zip(lines[1:], counts, strict=True):  # nothing removed: from offset 0
        assert f"(offsets 0 to {count:,}), 1 segment, " in line, line
        assert int(line.rsplit(", ", 1)[1].split()[0].replace(",", "")) > 0  # bytes on disk
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "partition 0",
        "partition 1",
        "partition 2",
    ]
    assert sum(counts) == LETTERS_ON_THE_LOG  # the 31 records and one marker per partition
    assert all(count >= 1 for count in counts)  # every partition has at least its marker
    positions = headwater("topics", "describe", "letters.source-positions", cwd=finished_run)
    assert positions.stdout.splitlines()[0].endswith("1 partitions, compacted=True, retention none")


def _tail(finished_run: Path, topic: str, *more: str) -> list[dict[str, object]]:
    result = headwater("topics", "tail", topic, *more, cwd=finished_run)
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def test_topics_tail(finished_run: Path) -> None:
    everything = _tail(finished_run, "upper", "-n", "100")
    assert len(everything) == 30
    assert sorted((r["value"] for r in everything), key=lambda v: orjson.loads(v)["n"]) == [  # type: ignore[arg-type]
        orjson.dumps({"letter": v["letter"].upper(), "n": v["n"]}).decode()  # type: ignore[attr-defined]
        for v in LETTERS
    ]
    for record in everything:
        assert record["key"] == orjson.loads(record["value"])["letter"].lower()  # type: ignore[arg-type]
        assert record["headers"] == {}
    # one key's records are all in one partition, in order
    by_key: dict[str, set[object]] = {}
    for record in everything:
        by_key.setdefault(record["key"], set()).add(record["partition"])  # type: ignore[arg-type]
    assert all(len(partitions) == 1 for partitions in by_key.values())

    last = _tail(finished_run, "upper", "-n", "2")
    for partition in (0, 1):
        mine = [r for r in everything if r["partition"] == partition]
        assert [r for r in last if r["partition"] == partition] == mine[-2:]
        assert [r["offset"] for r in mine] == list(range(len(mine)))

    default = _tail(finished_run, "upper")  # 10 per partition
    assert len(default) == sum(
        min(10, sum(r["partition"] == p for r in everything)) for p in (0, 1)
    )


def test_topics_tail_shows_the_end_of_time_markers_only_when_asked(finished_run: Path) -> None:
    records = _tail(finished_run, "letters", "-n", "100")
    assert len(records) == 31  # the source's records, without the markers among them
    assert all("watermark" not in r for r in records)
    assert sum(r["value"] == "not json" for r in records) == 1

    shown = _tail(finished_run, "letters", "-n", "100", "--markers")
    markers = [r for r in shown if "watermark" in r]
    assert [r for r in shown if "watermark" not in r] == records
    # one end-of-time marker per partition, from the source step, after its last record
    assert sorted(str(m["partition"]) for m in markers) == ["0", "1", "2"]
    for marker in markers:
        assert marker["watermark"] == {"writer": "letters", "mark": END_OF_TIME}
        mine = [int(str(r["offset"])) for r in records if r["partition"] == marker["partition"]]
        assert marker["offset"] == len(mine) == max(mine) + 1


def test_topics_tail_shows_dead_letter_headers(finished_run: Path) -> None:
    (dead,) = _tail(finished_run, "letters.dead-letters")
    assert dead["value"] == "not json"
    assert dead["key"] is None
    headers = dead["headers"]
    assert isinstance(headers, dict)
    assert headers["headwater.step"] == "letters"
    assert headers["headwater.source.topic"] == "letters"
    assert headers["headwater.error"]


def test_topics_describe_an_unknown_topic(finished_run: Path) -> None:
    result = headwater("topics", "describe", "uper", cwd=finished_run)
    assert_user_error(result, "no topic 'uper'", "`headwater topics list` shows them")


def test_topics_tail_an_unknown_topic(finished_run: Path) -> None:
    result = headwater("topics", "tail", "nope", cwd=finished_run)
    assert_user_error(result, "no topic 'nope'")


def test_topics_without_a_log(tmp_path: Path) -> None:
    result = headwater("topics", "list", cwd=tmp_path)
    assert_user_error(result, "no embedded log at .headwater", "--data-dir")
    assert not (tmp_path / ".headwater").exists()


def test_run_on_the_memory_backend(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py", "--backend", "memory", "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "letters: 31 in, 30 out, 1 to dead letters" in result.stderr
    assert "upper: 30 in, 30 out" in result.stderr
    assert not (tmp_path / ".headwater").exists()


# -- headwater run: workers that crash -------------------------------------------------------

CRASHING = """
import os
import re

import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("crash")
    .source(connectors.Iterable([{"n": 1}]), into=Topic("numbers", partitions=1))
    .map("crash", lambda v: os._exit(3))
    .sink(connectors.Stdout())
)
"""


def test_a_crashing_worker_is_restarted_up_to_the_limit(tmp_path: Path) -> None:
    write_module(tmp_path / "crash.py", CRASHING)
    result = headwater("run", "crash.py", "--max-restarts", "2", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("exited with status 3") == 3, result.stderr
    assert "worker 1 started in place of worker 0" in result.stderr, result.stderr
    assert "worker 2 started in place of worker 1" in result.stderr, result.stderr
    assert "failed after 2 restarts within a minute; giving up" in result.stderr, result.stderr


def test_without_restarts_a_crashing_worker_ends_the_run(tmp_path: Path) -> None:
    write_module(tmp_path / "crash.py", CRASHING)
    result = headwater("run", "crash.py", "--restart", "never", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "worker 0 exited with status 3" in result.stderr, result.stderr
    assert "started in place" not in result.stderr, result.stderr


# -- headwater run: one runner per pipeline and data directory -------------------------------

FOLLOWING = """
import connectors
from pipelines import Pipeline, Topic

pipeline = (
    Pipeline("tail")
    .source(connectors.JsonLines("in.jsonl", follow=True), into=Topic("lines", partitions=1))
    .sink(connectors.JsonLinesSink("out.jsonl"))
)
"""


def test_a_second_runner_of_a_running_pipeline_is_refused(tmp_path: Path) -> None:
    write_module(tmp_path / "tail.py", FOLLOWING)
    (tmp_path / "in.jsonl").write_text('{"n": 1}\n')
    lock = tmp_path / ".headwater" / "runs" / "tail.lock"
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "run", "tail.py", "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None, "the first runner ended"
            assert time.monotonic() < deadline, "the first runner never took its lock"
            time.sleep(0.05)
        second = headwater("run", "tail.py", cwd=tmp_path)
        assert_user_error(
            second,
            "pipeline 'tail' is already running on data directory .headwater",
            f"(runner pid {first.pid})",
            "headwater worker",
        )
    finally:
        first.kill()
        first.wait()
    with run_lock(tmp_path / ".headwater", "tail"):  # a killed runner's lock is free again
        pass


# -- headwater run: damaged offsets on the embedded log ---------------------------------------


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"99999999", ["committed offset 99,999,999 on letters[0], beyond the partition's end"]),
        (b"garbage", ["is damaged", "letters.0 holds b'garbage', not a number"]),
    ],
)
def test_a_damaged_committed_offset_stops_the_run(
    tmp_path: Path, content: bytes, needles: list[str]
) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    assert headwater("run", "letters.py", "--no-progress", cwd=tmp_path).returncode == 0
    offsets = tmp_path / ".headwater" / "groups" / "letters" / "offsets" / "letters.0"
    assert int(offsets.read_bytes().split()[0]) > 0
    offsets.write_bytes(content)
    result = headwater("run", "letters.py", "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    text = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in text, result.stderr


# -- headwater run: a second run with nothing new ---------------------------------------------


def test_a_second_run_says_its_source_found_nothing_new(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    first = headwater("run", "letters.py", "--no-progress", "--data-dir", "log", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "  source letters: 31 records written" in first.stderr
    second = headwater("run", "letters.py", "--no-progress", "--data-dir", "log", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert (
        "  source letters: nothing new since the last run (resumed at position 31); "
        "`headwater reset letters.py --data-dir log` starts afresh"
    ) in second.stderr
    assert "  letters: 0 in, 0 out" in second.stderr


# -- headwater run: a step that rejects most of its records -----------------------------------

TYPO = """
import connectors
from pipelines import Pipeline, Topic

ORDERS = [{{"id": i, "price": i / 10}} for i in range(2000)]


def total(order):
    return order["prise"] * 2 if order["id"] % {every} == 0 else order["price"] * 2


pipeline = (
    Pipeline("orders"{setting})
    .source(connectors.Iterable(ORDERS), into=Topic("orders", partitions=2))
    .map("total", total)
    .sink(connectors.LogTopic(Topic("totals", partitions=2)))
)
"""


def typo_module(tmp_path: Path, *, every: int = 1, setting: str = "") -> Path:
    """2,000 orders; ``total`` misspells a field for every ``every``-th (KeyError, line 9)."""
    return write_module(tmp_path / "typo.py", TYPO.format(every=every, setting=setting))


@pytest.mark.parametrize("backend", ["embedded", "memory"])
def test_a_step_that_dead_letters_most_records_fails_the_run(tmp_path: Path, backend: str) -> None:
    typo_module(tmp_path)
    result = headwater(
        "run", "typo.py", "--no-progress", "--workers", "2", "--backend", backend, cwd=tmp_path
    )
    assert_user_error(
        result,
        "step 'total' sent",
        "records to dead letters (100%), more than the 50% allowed",
        "The first: total (typo.py:8) raised KeyError: 'prise' at typo.py:9",
        "`headwater topics tail orders.dead-letters`",
    )


def test_the_dead_letter_limit_can_be_raised_and_the_summary_shows_the_first_error(
    tmp_path: Path,
) -> None:
    typo_module(tmp_path)
    result = headwater(
        "run", "typo.py", "--no-progress", "--max-dead-letter-ratio", "1", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "  total: 2,000 in, 0 out, 2,000 to dead letters" in result.stderr
    assert (
        "    first rejected: total (typo.py:8) raised KeyError: 'prise' at typo.py:9 "
        "(step 'total', record orders["
    ) in result.stderr


@pytest.mark.parametrize(
    ("every", "setting", "fails"),
    [
        (4, "", False),
        (4, ", max_dead_letter_ratio=0.2", True),
        (1, ", max_dead_letter_ratio=1", False),
    ],
    ids=["a quarter, under the default", "a quarter, over the pipeline's limit", "limit 1"],
)
def test_the_pipeline_sets_its_own_dead_letter_limit(
    tmp_path: Path, every: int, setting: str, fails: bool
) -> None:
    typo_module(tmp_path, every=every, setting=setting)
    result = headwater("run", "typo.py", "--no-progress", cwd=tmp_path)
    if fails:
        assert_user_error(result, "records to dead letters (25%), more than the 20% allowed")
    else:
        assert result.returncode == 0, result.stderr
        dead = 2000 // every
        assert f"  total: 2,000 in, {2000 - dead:,} out, {dead:,} to dead letters" in result.stderr


@pytest.mark.parametrize("ratio", ["-0.1", "1.5"])
def test_the_dead_letter_limit_is_a_share(tmp_path: Path, ratio: str) -> None:
    typo_module(tmp_path)
    result = headwater("run", "typo.py", "--max-dead-letter-ratio", ratio, cwd=tmp_path)
    assert_user_error(result, f"--max-dead-letter-ratio must be from 0 to 1, not {ratio}")
    typo_module(tmp_path, setting=f", max_dead_letter_ratio={ratio}")
    result = headwater("run", "typo.py", cwd=tmp_path)
    assert_user_error(result, "max_dead_letter_ratio must be a number from 0 to 1")


def test_the_summary_says_how_long_the_run_took_and_how_fast_it_read(tmp_path: Path) -> None:
    write_module(tmp_path / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = r"^  took ([\d.,]+) s: ([\d,]+) records read from the log, ([\d,]+) records/s$"
    took = re.search(line, result.stderr, re.M)
    assert took is not None, result.stderr
    seconds, records, rate = (float(g.replace(",", "")) for g in took.groups())
    # the letters, the run's own topics and the source's end-of-time markers (3 partitions)
    assert records >= LETTERS_ON_THE_LOG
    assert 0 < seconds < TIMEOUT
    # the seconds are printed to a tenth, the rate from the exact time
    assert records / (seconds + 0.05) - 1 <= rate <= records / max(seconds - 0.05, 0.01) + 1


# -- headwater run: the log -----------------------------------------------------------------------


def test_json_logs_are_one_object_per_line_and_end_with_the_summary(tmp_path: Path) -> None:
    """With --log-format json every line of stderr parses: progress and notes while it runs,
    then the summary with each step's counts and first rejected record."""
    typo_module(tmp_path, every=10)
    result = headwater(
        "run",
        "typo.py",
        "--workers",
        "2",
        "--log-format",
        "json",
        "--backend",
        "embedded",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    entries = [orjson.loads(line) for line in result.stderr.splitlines()]
    assert entries, "nothing logged"
    for entry in entries:
        assert {"time", "level", "logger", "message", "event"} <= entry.keys(), entry
        assert entry["time"].endswith("Z")
    summary = entries[-1]
    assert summary["event"] == "summary"
    assert summary["outcome"] == "finished"
    assert summary["sources"] == {"orders": 2000}
    assert summary["steps"]["total"] == {
        "in": 2000,
        "out": 1800,
        "skipped": 0,
        "dead_lettered": 200,
        "late": 0,
    }
    assert summary["first_rejected"]["total"].startswith(
        "total (typo.py:8) raised KeyError: 'prise' at typo.py:9"
    )
    assert summary["lag"] == 0
    assert any(e["event"] == "progress" for e in entries)


def test_a_user_error_in_json_logs_is_one_error_object(tmp_path: Path) -> None:
    result = headwater("run", "nowhere.py", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    entry = orjson.loads(line)
    assert entry["level"] == "error"
    assert entry["event"] == "error"
    assert entry["message"].startswith("no pipeline module at nowhere.py")


def test_text_logs_carry_time_and_level_and_warning_hides_progress(tmp_path: Path) -> None:
    typo_module(tmp_path, every=10)
    result = headwater("run", "typo.py", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "orders: read" in line]
    assert progress, result.stderr
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO \[.*", progress[0])
    quiet = headwater("run", "typo.py", "--log-level", "warning", "--data-dir", "q", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "orders: read" not in quiet.stderr
    assert "headwater: orders finished" in quiet.stderr  # the summary is not a log line
