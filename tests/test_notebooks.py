"""Every notebook in ``notebooks/`` runs top to bottom, with nbclient, against freshly loaded demo data.

The data is what ``make demo`` produces (the emulator's demo world, a first load, the clock moved six hours,
an incremental load, the models), written under a temporary folder, into DuckDB and into Parquet. The
notebooks' parameter convention: a cell tagged ``parameters`` that sets ``DATABASE`` (a DuckDB file) and
``PARQUET_DIR`` (a Parquet folder, or None); the test injects its own values right after that cell, as
papermill does. The kernel is this interpreter (the project's ``.venv``), declared in a temporary
kernelspec so that no other ``python3`` kernel on the machine can be picked up.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from opensearch_tasks.demo import DEMO_KEY_ID, DEMO_KEY_SECRET
from opensearch_tasks.emulator import Emulator, WorldSpec
from opensearch_tasks.runner import RunConfig, run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "opensearch-tasks-test"
IMAGE_TYPES = ("image/png", "image/svg+xml")


def _demo_world() -> WorldSpec:
    return WorldSpec(seed=42, app_groups=2, functions_per_group=3, instances_per_function=2)


def _load_demo(emu: Emulator, tmp: Path, **destination: str) -> None:
    """The demo's two loads (full, then incremental after six emulated hours) into one destination."""
    config = RunConfig(
        targets=sorted({t[0] for t in emu.targets()}),
        endpoint=emu.url,
        pipelines_dir=str(tmp / "dlt_pipelines"),
        credentials={"access_key_id": DEMO_KEY_ID, "access_key_secret": DEMO_KEY_SECRET},
        build_models=False,
        **destination,  # type: ignore[arg-type]
    )
    assert run(config).report.ok
    emu.advance(hours=6)
    config.build_models = destination.get("destination", "duckdb") == "duckdb"
    assert run(config).report.ok


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("notebook_data")
    paths = {"duckdb": tmp / "demo.duckdb", "parquet": tmp / "parquet"}
    with Emulator(_demo_world(), keys={DEMO_KEY_ID: DEMO_KEY_SECRET}) as emu:
        _load_demo(emu, tmp / "d", duckdb_path=str(paths["duckdb"]))
    with Emulator(_demo_world(), keys={DEMO_KEY_ID: DEMO_KEY_SECRET}) as emu:
        _load_demo(emu, tmp / "p", destination="parquet", parquet_dir=str(paths["parquet"]))
    return paths


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernelspec that runs this interpreter; MPLBACKEND=Agg so nothing needs a display."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "opensearch-tasks (.venv)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_path))
        patch.setenv("MPLBACKEND", "Agg")
        yield KERNEL


def _parameter_index(nb: nbformat.NotebookNode, name: str) -> int:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return index
    raise AssertionError(f"{name}: no code cell tagged 'parameters'")


def _execute(path: Path, parameters: str, kernel_name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    index = _parameter_index(nb, path.name)
    injected = nbformat.v4.new_code_cell(parameters, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=300,
        startup_timeout=120,
        resources={"metadata": {"path": str(path.parent)}},  # relative paths resolve as in Jupyter
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    return nb


def _plot_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]


def _has_image(cell: nbformat.NotebookNode) -> bool:
    return any(any(kind in out.get("data", {}) for kind in IMAGE_TYPES) for out in cell.outputs)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("source", ["duckdb", "parquet"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path, source: str, demo_data: dict[str, Path], kernel: str
) -> None:
    if source == "duckdb":
        database = demo_data["duckdb"]
        parameters = f"DATABASE = {str(database)!r}\nPARQUET_DIR = None"
        before = _sha256(database)
    else:
        parameters = f"DATABASE = None\nPARQUET_DIR = {str(demo_data['parquet'])!r}"

    nb = _execute(path, parameters, kernel)

    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable  # the project's interpreter
    plots = _plot_cells(nb)
    missing = [c.source.splitlines()[0] for c in plots if not _has_image(c)]
    assert not missing, f"plot cells without an image: {missing}"
    if source == "duckdb":
        assert _sha256(database) == before, "the notebook changed the database it should only read"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_its_outputs(path: Path) -> None:
    """A reader sees the plots without running anything, and no saved output is an error."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "saved without running every cell"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"saved with an error output: {errors[0].get('ename')}"
    plots = _plot_cells(nb)
    assert plots and all(_has_image(c) for c in plots), "saved without its plots"
    assert path.stat().st_size < 400_000, f"{path.name} is {path.stat().st_size} bytes: keep it small"
