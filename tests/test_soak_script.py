"""``scripts/soak.sh`` (docs/testing.md): it runs the given tests the given number of times
beside busy processes, stops at the first failure, and leaves no busy process behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak.sh"


def soak(*args: str) -> subprocess.Popen[str]:
    """Run the script in a session of its own (to find what it leaves behind)."""
    return subprocess.Popen(
        ["bash", str(SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def left_behind(session: int) -> list[int]:
    """Live processes of ``session``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def test_soak_runs_the_tests_each_time_beside_busy_processes(tmp_path: Path) -> None:
    test = tmp_path / "test_passes.py"
    test.write_text("def test_passes():\n    assert True\n")
    process = soak("2", "1", str(test))
    code, out, err = finish(process)
    assert code == 0, err
    assert "soak: run 1 of 2 passed" in out
    assert "soak: run 2 of 2 passed" in out
    assert "with 1 busy processes" in out
    assert not left_behind(process.pid)


def test_soak_stops_at_the_first_failure(tmp_path: Path) -> None:
    test = tmp_path / "test_fails.py"
    test.write_text("def test_fails():\n    assert False\n")
    process = soak("3", "1", str(test))
    code, out, err = finish(process)
    assert code == 1
    assert "soak: run 1 of 3 failed" in err
    assert "run 2" not in out + err
    assert not left_behind(process.pid)
