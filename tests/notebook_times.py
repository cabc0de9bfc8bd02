"""How long each part of the course notebook (notebooks/vkd_tour.ipynb) takes: it runs the notebook
top to bottom with nbclient, its runs in a new temporary folder (so that part 3 draws the demo and
builds its image cache, as a student's first run does), and prints the time of each part from the
cells' own execution times. A script, not a test (pytest does not collect it); the table in the
notebook's header comes from it.

    python tests/notebook_times.py              # parts 1-4 in a few minutes on a 2-core CPU
    python tests/notebook_times.py --rounds 3   # the range over three executions
"""
import argparse
import os
import re
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from vkd.runtime import cpu_name  # noqa: E402  (after the path: run as a script from anywhere)

NOTEBOOK = REPO / "notebooks" / "vkd_tour.ipynb"


def part_times(notebook):
    """{part number: seconds its code cells ran}, from the execution times nbclient records; a
    part starts at a markdown cell that begins with '## Part N'."""
    times, part = {}, None
    for cell in notebook.cells:
        heading = re.match(r"## Part (\d+)", cell.source) if cell.cell_type == "markdown" else None
        if heading:
            part = int(heading.group(1))
        if cell.cell_type == "code" and part is not None:
            timing = cell.metadata["execution"]
            start = datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
            times[part] = times.get(part, 0.0) + (end - start).total_seconds()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1,
                        help="executions, each from a new run folder (default: 1)")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as runs:
            os.environ["VKD_NOTEBOOK_RUNS"] = runs         # the kernel inherits it
            notebook = nbformat.read(NOTEBOOK, as_version=4)
            client = NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                    resources={"metadata": {"path": str(REPO)}})
            rounds.append(part_times(client.execute()))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{cpu_name()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}; "
          f"{args.rounds} execution(s)")
    for part in sorted(rounds[0]):
        seconds = [times[part] for times in rounds]
        low, high = round(min(seconds)), round(max(seconds))
        print(f"part {part}: {low} s" + (f" to {high} s" if high > low else ""))


if __name__ == "__main__":
    main()
