"""The course notebook (notebooks/vkd_tour.ipynb) runs top to bottom on a CPU: nbclient executes it
from the repository root with its runs in a temporary folder, and every part leaves its mark in the
outputs (parts 1-4 their printed lines and pictures, part 5 its skip message). Skipped where
nbclient is not installed (requirements-test.txt has it)."""
import json
import shlex
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

import train  # noqa: E402  (after the skips: the notebook's part 5 command is parsed with it)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "vkd_tour.ipynb"
CELL_TIMEOUT_S = 600          # one cell; the longest trains the tiny preset (about a minute here)


def execute(notebook, cwd, timeout=CELL_TIMEOUT_S):
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    return client.execute()


def outputs(notebook):
    """(all the text the cells printed or displayed, the number of image/png outputs)."""
    texts, images = [], 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append(output["text"])
            elif output["output_type"] in ("display_data", "execute_result"):
                images += "image/png" in output["data"]
                texts.append(output["data"].get("text/markdown", ""))
                texts.append(output["data"].get("text/plain", ""))
            elif output["output_type"] == "error":
                texts.append("\n".join(output["traceback"]))
    return "\n".join(texts), images


def top_level():
    """The repository's top-level names (bytecode caches aside: the kernel imports model.py)."""
    return sorted(path.name for path in REPO.iterdir() if path.name != "__pycache__")


def test_the_notebook_is_stored_without_outputs():
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and cell["execution_count"] is None
                        for cell in code)


def test_the_notebook_runs_top_to_bottom_on_a_cpu(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("VKD_NOTEBOOK_RUNS", str(runs))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")          # part 5 must skip, GPU or not
    before = top_level()
    notebook_runs_existed = (REPO / "runs" / "notebook").exists()
    notebook = execute(nbformat.read(NOTEBOOK, as_version=4), REPO)   # raises on a cell error
    text, images = outputs(notebook)
    # part 1: setup
    assert "torch " in text and "device: cpu" in text and f"runs go to: {runs}" in text
    # part 2: the method
    assert "def forward(self" in text and "beta * kl" in text           # inspect.getsource
    assert "gaussian_kl matches torch.distributions.kl_divergence" in text
    assert "reparameterize: one draw has shape (1, 1, 2)" in text
    assert "predict read the image only: probabilities (6, 14)" in text
    assert "predict_with_text raised: the text encoder ran" in text
    # part 3: two tiny runs, their curves
    assert text.count("wall time") == 2 and "vkd per epoch:" in text
    for method in ("vkd", "image"):
        assert (runs / method / "best.pt").is_file() and (runs / method / "log.jsonl").is_file()
    # part 4: the paired comparison and the ROC curves
    assert "vkd - image" in text and "the paired comparison:" in text
    assert (runs / "compare" / "roc.png").is_file()
    assert images >= 2, f"{images} image/png outputs: the training and ROC curves"
    # part 5: skipped, and the commands it would run are valid train.py command lines
    assert "Part 5 skipped: no GPU" in text and not (runs / "gpu").exists()
    commands = [line for line in text.splitlines() if line.startswith("  python train.py")]
    parsed = [train.get_args(shlex.split(command)[2:]) for command in commands]
    assert [(args.data, args.method, args.backbone, args.image_size) for args in parsed] == \
        [("openi", method, "densenet121", 224) for method in ("image", "vkd", "text")]
    assert top_level() == before, "the notebook wrote into the repository"
    assert (REPO / "runs" / "notebook").exists() == notebook_runs_existed


def test_outside_a_checkout_the_setup_asks_for_the_repository_url(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    setup = next(cell for cell in notebook.cells if "REPO_URL" in cell.source
                 and cell.cell_type == "code")
    notebook.cells = [setup]
    folder = tmp_path / "elsewhere" / "inner"           # neither it nor its parent holds train.py
    folder.mkdir(parents=True)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
        execute(notebook, folder, timeout=120)
    assert "paste the repository's URL into REPO_URL" in str(error.value)
