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
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient
from opensearch_tasks.demo import DEMO_KEY_ID, DEMO_KEY_SECRET
from opensearch_tasks.emulator import Emulator, WorldSpec
from opensearch_tasks.models import build_models, connect_models
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


@pytest.fixture(scope="module")
def executed(demo_data: dict[str, Path], kernel: str) -> Callable[[Path, str], nbformat.NotebookNode]:
    """Each notebook run once per source, shared by the tests that read its outputs."""
    runs: dict[tuple[Path, str], nbformat.NotebookNode] = {}

    def run(path: Path, source: str) -> nbformat.NotebookNode:
        if (path, source) not in runs:
            if source == "duckdb":
                parameters = f"DATABASE = {str(demo_data['duckdb'])!r}\nPARQUET_DIR = None"
            else:
                parameters = f"DATABASE = None\nPARQUET_DIR = {str(demo_data['parquet'])!r}"
            runs[(path, source)] = _execute(path, parameters, kernel)
        return runs[(path, source)]

    return run


@pytest.mark.parametrize("source", ["duckdb", "parquet"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(
    path: Path, source: str, demo_data: dict[str, Path], executed: Callable[..., Any]
) -> None:
    before = _sha256(demo_data["duckdb"])
    nb = executed(path, source)

    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable  # the project's interpreter
    plots = _plot_cells(nb)
    missing = [c.source.splitlines()[0] for c in plots if not _has_image(c)]
    assert not missing, f"plot cells without an image: {missing}"
    assert _sha256(demo_data["duckdb"]) == before, (
        "the notebook changed the database it should only read"
    )


class _HtmlTables(HTMLParser):
    """The cells of every ``<table>`` in a DataFrame's HTML output (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _shown_tables(nb: nbformat.NotebookNode) -> list[list[dict[str, str]]]:
    """Every DataFrame the notebook displays, as rows keyed by column name."""
    shown = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            html = output.get("data", {}).get("text/html")
            if not html:
                continue
            parser = _HtmlTables()
            parser.feed(html)
            for table in parser.tables:
                rows = [row for row in table if row]
                header = rows[0][1:] if rows and rows[0] and rows[0][0] == "" else rows[0]
                shown.append([dict(zip(header, row[1:], strict=False)) for row in rows[1:]])
    return shown


def _table_with(shown: list[list[dict[str, str]]], *columns: str) -> list[dict[str, str]]:
    found = [rows for rows in shown if rows and all(c in rows[0] for c in columns)]
    assert found, f"no table with columns {columns} is shown"
    return found[0]


def _close(text: str, value: float | None, digits: int = 3) -> bool:
    if value is None:
        return text in ("None", "NaN", "<NA>", "")
    return abs(float(text) - value) <= 0.6 * 10**-digits + 1e-9 * abs(value)


@pytest.mark.parametrize("source", ["duckdb", "parquet"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_tables_show_the_models_numbers(
    path: Path, source: str, demo_data: dict[str, Path], executed: Callable[..., Any]
) -> None:
    """What a reader sees in the tables is what the models hold for the same data."""
    shown = _shown_tables(executed(path, source))
    if source == "duckdb":
        con = connect_models(demo_data["duckdb"], read_only=True)
    else:
        con = duckdb.connect()
        build_models(con, source="parquet", parquet_dir=demo_data["parquet"])
    with con:
        summary = _table_with(shown, "tasks", "instances", "running")[0]
        counts = con.execute(
            "select count(*), count(distinct (app_group, function_name, instance_name)), "
            "count(*) filter (where status = 'running') from analytics.stg_function_tasks"
        ).fetchone()
        assert (int(summary["tasks"]), int(summary["instances"]), int(summary["running"])) == counts

        overall = {
            row[:3]: row[3:]
            for row in con.execute(
                "select app_group, function_name, instance_name, tasks_failed, tasks_succeeded, "
                "tasks_running, success_rate from analytics.overall_success_rates"
            ).fetchall()
        }
        failing = _table_with(shown, "tasks_failed", "tasks_succeeded", "success_rate")
        assert failing, "the failing-instances table is empty"
        for row in failing:
            failed, succeeded, running, rate = overall[
                (row["app_group"], row["function_name"], row["instance_name"])
            ]
            assert (
                int(row["tasks_failed"]),
                int(row["tasks_succeeded"]),
                int(row["tasks_running"]),
            ) == (
                failed,
                succeeded,
                running,
            ), row
            assert _close(row["success_rate"], rate), (row, rate)

        durations = {
            row[:3]: row[3:]
            for row in con.execute(
                "select app_group, function_name, instance_name, finished_tasks, "
                "p50_duration_seconds / 60, p90_duration_seconds / 60 from analytics.training_durations"
            ).fetchall()
        }
        for row in _table_with(shown, "finished_tasks", "p50_minutes", "p90_minutes"):
            finished, p50, p90 = durations[
                (row["app_group"], row["function_name"], row["instance_name"])
            ]
            assert int(row["finished_tasks"]) == finished, row
            assert _close(row["p50_minutes"], p50, 1) and _close(row["p90_minutes"], p90, 1), (
                row,
                p50,
                p90,
            )

        errors: dict[str, int] = {}
        for message, count in con.execute(
            "select error_message, failed_tasks from analytics.training_failures"
        ).fetchall():
            errors[message] = errors.get(message, 0) + count
        for row in _table_with(shown, "error_message", "failed_tasks"):
            assert int(row["failed_tasks"]) == errors[row["error_message"]], row

        metrics = {
            row[:4]: row[4:]
            for row in con.execute(
                "select app_group, function_name, instance_name, metric_name, metric_value, "
                "previous_metric_value from analytics.latest_training_metrics"
            ).fetchall()
        }
        for row in _table_with(shown, "metric_name", "metric_value", "previous_metric_value"):
            value, previous = metrics[
                (row["app_group"], row["function_name"], row["instance_name"], row["metric_name"])
            ]
            assert _close(row["metric_value"], value) and _close(
                row["previous_metric_value"], previous
            ), row


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
