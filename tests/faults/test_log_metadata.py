"""Damaged metadata of the embedded log, files Headwater may not open, a full disk and a deleted
committed offset: each stops ``headwater run`` / ``headwater topics tail`` with one paragraph
naming the file and the fix (exit status 2, no traceback), and nothing is processed twice.

Real CLI processes on a copy of a finished run's data directory. Permission cases drop, in the
child only, what lets root ignore permission bits (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so
``chmod 000`` binds whoever runs the tests; if it cannot, they fail rather than pass vacuously.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support.cli import TIMEOUT, assert_user_error, headwater, write_module
from support.logs import read_topic
from test_cli import GOOD_MODULE

DATA = ".headwater"
PERMISSIONS = "Check the owner and permissions of that file"
UPPER = Counter(orjson.dumps({"letter": c.upper(), "n": i}) for i, c in enumerate("abcdefghij" * 3))

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def _bound_by_permissions() -> None:
    """In the child, before it starts: permission bits apply to it even under root."""
    if os.geteuid() != 0:
        return
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot drop root's override of permission bits")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where ``headwater run letters.py`` ran to the end."""
    directory = tmp_path_factory.mktemp("finished")
    write_module(directory / "letters.py", GOOD_MODULE)
    result = headwater("run", "letters.py", "--no-progress", cwd=directory)
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run to damage."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path


@contextlib.contextmanager
def unreadable(path: Path) -> Iterator[None]:
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        yield
    finally:
        path.chmod(mode)


def upper_values(directory: Path) -> Counter[bytes]:
    return Counter(value or b"" for _, value in read_topic(directory / DATA, "upper").records)


def test_chmod_binds_the_children_of_these_tests(tmp_path: Path) -> None:
    """The permission cases below mean something only if this holds (under root too)."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    with unreadable(secret):
        result = subprocess.run(
            [sys.executable, "-c", "open('secret').read()"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            preexec_fn=_bound_by_permissions,
        )
    assert result.returncode == 1, "a chmod 000 file was readable: the permission cases are void"
    assert "PermissionError" in result.stderr, result.stderr


# -- files and directories Headwater may not open --------------------------------------------

RUN = ("run", "letters.py", "--no-progress")
TAIL = ("topics", "tail", "letters")


@pytest.mark.parametrize(
    ("target", "command", "message"),
    [
        ("topics/letters/0.log", RUN, "cannot open .headwater/topics/letters/0.log"),
        ("topics/letters/0.log", TAIL, "cannot open .headwater/topics/letters/0.log"),
        # readers do not open <p>.end (a writer does, to acknowledge what it appended)
        ("topics/letters/0.end", RUN, "cannot open .headwater/topics/letters/0.end"),
        ("topics/letters", RUN, "cannot read .headwater/topics/letters/topic.json"),
        ("topics/letters", TAIL, "cannot read .headwater/topics/letters/topic.json"),
        (
            "groups/letters/offsets/letters.0",
            RUN,
            "cannot read the committed offset in .headwater/groups/letters/offsets/letters.0",
        ),
        ("groups/letters", RUN, ".headwater/groups/letters/"),
    ],
    ids=[
        "log-run",
        "log-tail",
        "end-run",
        "topic-dir-run",
        "topic-dir-tail",
        "offsets-run",
        "group-dir-run",
    ],
)
def test_a_file_headwater_may_not_open(
    run_dir: Path, target: str, command: tuple[str, ...], message: str
) -> None:
    with unreadable(run_dir / DATA / target):
        result = headwater(*command, cwd=run_dir, preexec_fn=_bound_by_permissions)
    assert_user_error(result, message, "Permission denied (EACCES)", PERMISSIONS)
    assert upper_values(run_dir) == UPPER  # nothing processed again


PENDING = """
from pipelines.errors import LogError
from pipelines.log._commits import pending_commits
from pathlib import Path

try:
    pending_commits(Path("commits"))
except LogError as error:
    print(error)
"""


def test_pending_commits_in_a_directory_that_cannot_be_listed(tmp_path: Path) -> None:
    """Exactly-once commits waiting to be applied are never taken for none at all."""
    (tmp_path / "commits").mkdir()
    (tmp_path / "commits" / "0000000000000001-0.commit").write_bytes(b"")
    with unreadable(tmp_path / "commits"):
        result = subprocess.run(
            [sys.executable, "-c", PENDING],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            preexec_fn=_bound_by_permissions,
        )
    assert result.returncode == 0, result.stderr
    assert "cannot list the pending commits in commits: Permission denied" in result.stdout
    assert PERMISSIONS in result.stdout


@pytest.mark.parametrize("target", ["groups/letters/offsets/letters.0", "groups/letters"])
def test_topics_tail_reads_no_group_files(run_dir: Path, target: str) -> None:
    with unreadable(run_dir / DATA / target):
        result = headwater(*TAIL, cwd=run_dir, preexec_fn=_bound_by_permissions)
    assert result.returncode == 0, result.stderr
    assert {orjson.loads(line)["partition"] for line in result.stdout.splitlines()} == {0, 1, 2}


def test_a_partition_a_worker_may_not_open(run_dir: Path) -> None:
    """The error of a worker process (here: appending outputs) reaches the user alike."""
    shutil.rmtree(run_dir / DATA / "groups" / "letters")  # a fresh start: process it all again
    with unreadable(run_dir / DATA / "topics" / "upper" / "0.log"):
        result = headwater(*RUN, cwd=run_dir, preexec_fn=_bound_by_permissions)
    assert_user_error(
        result,
        "worker 0 stopped: cannot open .headwater/topics/upper/0.log",
        "Permission denied (EACCES)",
        PERMISSIONS,
    )


@pytest.mark.parametrize("command", [RUN, TAIL], ids=["run", "tail"])
def test_a_data_directory_headwater_may_not_open(run_dir: Path, command: tuple[str, ...]) -> None:
    with unreadable(run_dir / DATA):
        result = headwater(*command, cwd=run_dir, preexec_fn=_bound_by_permissions)
    assert_user_error(result, ".headwater", "Permission denied", "permissions")


# -- a damaged topic.json ----------------------------------------------------------------------

REWRITE = '{"partitions":3,"compacted":false,"retention_ms":null}'


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "it is empty"),
        (b'{"partitions": 3, "compac', "it is not valid JSON"),
        (b'{"compacted": false, "retention_ms": null}', "it lacks 'partitions'"),
        (b'{"partitions": 0, "compacted": false, "retention_ms": null}', "partition count 0"),
        (b'{"partitions": "3", "compacted": false, "retention_ms": null}', "count '3' is not"),
    ],
    ids=["empty", "garbage", "no-partitions", "zero-partitions", "text-partitions"],
)
@pytest.mark.parametrize("command", [RUN, TAIL], ids=["run", "tail"])
def test_a_damaged_topic_json(
    run_dir: Path, content: bytes, problem: str, command: tuple[str, ...]
) -> None:
    meta = run_dir / DATA / "topics" / "letters" / "topic.json"
    meta.write_bytes(content)
    result = headwater(*command, cwd=run_dir)
    assert_user_error(
        result,
        ".headwater/topics/letters/topic.json, the configuration of topic 'letters', is damaged",
        problem,
        "Restore it from a copy",
        f"judging by its partition files, the last of which is 2.log, it should hold {REWRITE}",
    )
    meta.write_text(REWRITE)  # as the message says
    again = headwater(*RUN, cwd=run_dir)
    assert again.returncode == 0, again.stderr
    assert upper_values(run_dir) == UPPER  # nothing processed twice


def test_a_damaged_topic_json_without_partition_files(run_dir: Path) -> None:
    topic = run_dir / DATA / "topics" / "letters"
    for path in topic.glob("*.log"):
        path.unlink()
    (topic / "topic.json").write_bytes(b"{}")
    result = headwater(*TAIL, cwd=run_dir)
    assert_user_error(
        result,
        "topics/letters/topic.json",
        "it lacks 'partitions', 'compacted', 'retention_ms'",
        '{"partitions":N,"compacted":false,"retention_ms":null}, where N is the number of '
        "partitions the pipeline declares for the topic",
    )


# -- a full disk -------------------------------------------------------------------------------

COUNT = 20_000
LIMIT = 256 * 1024  # bytes a file may grow to: the input partition reaches it first
COUNTING = f"""
import connectors
from pipelines import Pipeline, Topic


def numbers():
    for n in range({COUNT}):
        yield {{"n": n, "padding": "x" * 60}}


pipeline = (
    Pipeline("counting")
    .source(connectors.Iterable(numbers, batch_size=500), into=Topic("numbers"))
    .map("small", lambda v: v["n"])
    .sink(connectors.LogTopic(Topic("seen")))
)
"""


def _file_size_limited() -> None:
    """In the child: writes past LIMIT bytes fail with EFBIG (the signal ignored), as on a
    full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.RLIM_INFINITY))


def test_a_full_disk_stops_the_run_and_a_rerun_finishes(tmp_path: Path) -> None:
    write_module(tmp_path / "counting.py", COUNTING)
    partition = tmp_path / DATA / "topics" / "numbers" / "0.log"

    run = ("run", "counting.py", "--no-progress")
    full = headwater(*run, cwd=tmp_path, preexec_fn=_file_size_limited)
    assert_user_error(
        full,
        "cannot append to .headwater/topics/numbers/0.log: File too large (EFBIG)",
        "raise the limit, then run again",
        "Records appended before are intact",
    )
    (acknowledged,) = struct.unpack("<Q", partition.with_suffix(".end").read_bytes())
    assert acknowledged < partition.stat().st_size == LIMIT  # a torn frame past the end

    again = headwater(*run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    assert f"cutting off {LIMIT - acknowledged} bytes of a torn write" in again.stderr
    seen = [orjson.loads(value or b"") for _, value in read_topic(tmp_path / DATA, "seen").records]
    assert set(seen) == set(range(COUNT))


# -- a deleted committed offset ----------------------------------------------------------------


def test_a_deleted_offsets_file_stops_the_run(run_dir: Path) -> None:
    groups = run_dir / DATA / "groups" / "letters"
    assert (groups / "committed" / "letters.1").exists()
    (groups / "offsets" / "letters.1").unlink()
    result = headwater(*RUN, cwd=run_dir)
    assert_user_error(
        result,
        "the committed offset of group 'letters' on letters[1] was deleted",
        ".headwater/groups/letters/offsets/letters.1 is missing",
        "would process its records again",
        "Restore the file from a copy",
        "write the offset to resume from into it",
        "`headwater reset`",
    )
    assert upper_values(run_dir) == UPPER  # no record emitted twice


def test_an_offset_written_back_resumes_the_run(run_dir: Path) -> None:
    offsets = run_dir / DATA / "groups" / "letters" / "offsets" / "letters.1"
    offset = offsets.read_bytes()
    offsets.unlink()
    assert headwater(*RUN, cwd=run_dir).returncode == 2
    offsets.write_bytes(offset)
    result = headwater(*RUN, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert upper_values(run_dir) == UPPER


def test_a_deleted_group_directory_is_a_fresh_start(run_dir: Path) -> None:
    shutil.rmtree(run_dir / DATA / "groups" / "letters")
    result = headwater(*RUN, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert "letters: 31 in, 30 out, 1 to dead letters" in result.stderr
    assert upper_values(run_dir) == UPPER + UPPER  # everything processed again, as asked
    committed = run_dir / DATA / "groups" / "letters" / "committed"
    assert sorted(path.name for path in committed.iterdir()) == [
        "letters.0",
        "letters.1",
        "letters.2",
    ]


def test_a_data_directory_from_before_the_committed_markers(run_dir: Path) -> None:
    shutil.rmtree(run_dir / DATA / "groups" / "letters" / "committed")
    result = headwater(*RUN, cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert upper_values(run_dir) == UPPER
