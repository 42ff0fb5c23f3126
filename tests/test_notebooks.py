"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel.

The kernel gets this process's environment: ``kafka.ipynb`` reads the test broker's address
from ``HEADWATER_TEST_KAFKA`` and fails, as this test does, when it is not set.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
assert NOTEBOOKS, "notebooks/ has no notebook to execute"
NEEDS_KAFKA = {"kafka.ipynb"}
CELL_TIMEOUT = 120
"""Seconds a cell may take; each notebook takes well under 60 s on a 2-core machine."""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path) -> None:
    if path.name in NEEDS_KAFKA and not os.environ.get("HEADWATER_TEST_KAFKA"):
        pytest.fail(
            f"{path.name} needs a Kafka broker: start one with `bash scripts/kafka.sh start` "
            "and set HEADWATER_TEST_KAFKA to its address (scripts/test.sh does both)",
            pytrace=False,
        )
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": path.parent}},
    )
    client.execute(env=dict(os.environ))  # the kernel's environment: this process's
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors[0].get("evalue")
