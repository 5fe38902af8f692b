"""The HTML report (``opensearch_tasks.html_report``), on the demo's data, read and then opened.

The data is what ``make demo`` loads (the emulator's demo world: 12 instances, a first load, the
clock moved six hours, an incremental load, the models) in a DuckDB file under a temporary folder;
the alerts are made by hand (the report takes them as a list). An HTML parser checks the page:
alerts first, each instance with its five parts, a regression marked, nothing that points outside
the file, and text from the API escaped (a copy of the database whose instance name and error
message carry markup).

Then headless Chromium (Debian's ``chromium``; ``make browser`` installs it, and these tests fail
without it) opens the file as a laptop (1280 px) and as a phone (390 px) and takes screenshots,
kept in the test's temporary folder (``UPDATE_REPORT_SCREENSHOT=1`` also copies the laptop one to
docs/report.png). No debugging protocol is needed to see what went wrong in the page:

* console: ``--enable-logging=stderr`` makes Chromium write every console message of the page to
  stderr as ``INFO:CONSOLE...``: uncaught errors, ``console.*`` calls, and the Content-Security-Policy
  violations that the report's CSP (``default-src 'none'``) raises for any load it blocks. The page
  has no script, so any console line at all fails the test.
* network: ``--log-net-log`` records every request Chromium makes; a request of the page (its
  network isolation key or its initiator is the file's) to anything but ``file:``/``data:`` fails
  the test. Chromium's own background requests (component updates) are not the page's.
* a canary page with a script error, a ``console.error`` and an external image proves that both
  detections work with the Chromium installed, so a silent change of its log format cannot make
  the checks pass vacuously.
* layout: the phone screenshot cannot show a page wider than the screen (it is cut off), so a copy
  of the report, with a one-line script and without the CSP, measures the page at 390 px.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
from opensearch_tasks.alerts import Alert, read_alerts
from opensearch_tasks.demo import DEMO_KEY_ID, DEMO_KEY_SECRET
from opensearch_tasks.emulator import Emulator, WorldSpec
from opensearch_tasks.html_report import metric_series, render_html, write_html_report
from opensearch_tasks.models import build_models, connect_models
from opensearch_tasks.report import ModelsNotBuiltError
from opensearch_tasks.runner import RunConfig, run

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = ROOT / "docs" / "report.png"
VIEWPORTS = {"laptop": (1280, 2000), "phone": (390, 2000)}
PARTS = ["success-rate", "durations", "metrics", "failures", "stuck"]
GENERATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
MAX_BYTES = 400_000

EVIL_INSTANCE = '<script>alert("instance")</script> & co'
EVIL_MESSAGE = '<img src=x onerror=alert(1)> "quoted" & <b>bold</b>'
EVIL_METRIC = "<u>metric</u>"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
CONSOLE_LINE = re.compile(r":CONSOLE\b|Uncaught|net::ERR_")


# --- data and pages --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make demo``'s data and models in a DuckDB file."""
    tmp = tmp_path_factory.mktemp("html_report_data")
    path = tmp / "demo.duckdb"
    spec = WorldSpec(seed=42, app_groups=2, functions_per_group=3, instances_per_function=2)
    with Emulator(spec, keys={DEMO_KEY_ID: DEMO_KEY_SECRET}) as emu:
        config = RunConfig(
            targets=sorted({t[0] for t in emu.targets()}),
            endpoint=emu.url,
            duckdb_path=str(path),
            pipelines_dir=str(tmp / "dlt_pipelines"),
            credentials={"access_key_id": DEMO_KEY_ID, "access_key_secret": DEMO_KEY_SECRET},
            build_models=False,
        )
        assert run(config).report.ok
        emu.advance(hours=6)
        config.build_models = True
        assert run(config).report.ok
    return path


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _demo_alerts(con: duckdb.DuckDBPyConnection) -> list[Alert]:
    """One alert of a few kinds, worded like the alerts model words them, on real instances."""
    metrics = _rows(
        con,
        "select * from analytics.latest_training_metrics "
        "where regexp_matches(metric_name, '(recall|coverage|accuracy|precision)$') "
        "order by app_group, function_name, instance_name, metric_name",
    )
    metric = metrics[len(metrics) // 2]
    baseline = metric["metric_value"] * 1.3
    stuck = _rows(con, "select * from analytics.stuck_training_tasks order by start_time limit 1")
    failing = _rows(
        con, "select * from analytics.overall_success_rates order by success_rate, instance_name limit 1"
    )[0]
    alerts = [
        Alert(
            "metric_regression",
            metric["app_group"],
            metric["function_name"],
            metric["instance_name"],
            metric["start_time"],
            f"{metric['metric_name']} fell to {metric['metric_value']:.4g} against a mean of "
            f"{baseline:.4g} over the previous 10 successful runs (higher is better)",
            metric=metric["metric_name"],
            value=metric["metric_value"],
            baseline=baseline,
            run_id=metric["run_id"],
        ),
        Alert(
            "failure_streak",
            failing["app_group"],
            failing["function_name"],
            failing["instance_name"],
            failing["newest_start_time"],
            "the newest 3 finished tasks all failed",
            value=3.0,
            baseline=3.0,
        ),
        Alert(
            "load_freshness",
            None,
            None,
            None,
            datetime(2026, 1, 1, tzinfo=UTC),
            "no task fetched for 30.5 h (threshold 24.0 h)",
            value=30.5,
            baseline=24.0,
        ),
    ]
    if stuck:
        row = stuck[0]
        alerts.insert(
            2,
            Alert(
                "stuck",
                row["app_group"],
                row["function_name"],
                row["instance_name"],
                row["start_time"],
                f"{row['run_id']} has been running for {row['elapsed_seconds'] / 3600:.1f} h",
                value=row["elapsed_seconds"],
                baseline=3 * row["p90_duration_seconds"],
                run_id=row["run_id"],
            ),
        )
    return alerts


@dataclass
class Page:
    path: Path
    html: str
    alerts: list[Alert]
    instances: list[str]  # app_group/function/instance, in the models' order


def _write_page(db: Path, out: Path, alerts_for: Any) -> Page:
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    with connect_models(db, read_only=True) as con:
        alerts = alerts_for(con)
        instances = [
            "/".join(row)
            for row in con.execute(
                "select app_group, function_name, instance_name from analytics.overall_success_rates "
                "order by all"
            ).fetchall()
        ]
        write_html_report(con, out, alerts, title="Training tasks: demo")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest, "the report changed the database"
    return Page(out, out.read_text(encoding="utf-8"), alerts, instances)


@pytest.fixture(scope="module")
def page(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    """The demo's report, written by write_html_report."""
    return _write_page(demo_db, tmp_path_factory.mktemp("html_report") / "report.html", _demo_alerts)


@pytest.fixture(scope="module")
def hostile_page(demo_db: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    """The report of a copy of the data in which one instance's name and one error message carry
    markup (both come from the API), with alerts that carry it too."""
    tmp = tmp_path_factory.mktemp("html_report_hostile")
    db = tmp / "hostile.duckdb"
    shutil.copyfile(demo_db, db)
    with duckdb.connect(str(db)) as con:
        build_models(con, source="duckdb", time_zone="Asia/Shanghai")  # days in another zone
        failed = con.execute(
            "select app_group, function_name, instance_name, run_id from opensearch_tasks.function_tasks "
            "where status = 'failed' order by all limit 1"
        ).fetchone()
        assert failed is not None
        app_group, function_name, instance_name, run_id = failed
        con.execute(
            "update opensearch_tasks.function_tasks set extend_info = ?, is_extend_info_malformed = false "
            "where app_group = ? and function_name = ? and instance_name = ? and run_id = ?",
            [
                json.dumps({"errors": [{"code": "E_HTML", "message": EVIL_MESSAGE}]}),
                app_group,
                function_name,
                instance_name,
                run_id,
            ],
        )
        con.execute(
            "update opensearch_tasks.function_tasks set instance_name = ? "
            "where app_group = ? and function_name = ? and instance_name = ?",
            [EVIL_INSTANCE, app_group, function_name, instance_name],
        )
        # one task 120 days before the rest: a history longer than two months is drawn by week
        con.execute(
            "update opensearch_tasks.function_tasks set start_time = start_time - interval 120 day "
            "where app_group = ? and function_name = ? and instance_name = ? and run_id = ?",
            [app_group, function_name, EVIL_INSTANCE, run_id],
        )

    def alerts_for(con: duckdb.DuckDBPyConnection) -> list[Alert]:
        since = datetime(2026, 1, 1, tzinfo=UTC)
        return [
            Alert("failure_streak", app_group, function_name, EVIL_INSTANCE, since, EVIL_MESSAGE),
            Alert(
                "metric_regression",
                app_group,
                function_name,
                EVIL_INSTANCE,
                since,
                EVIL_MESSAGE,
                metric=EVIL_METRIC,
                value=1.0,
                baseline=2.0,
                run_id=EVIL_INSTANCE,
            ),
        ]

    return _write_page(db, tmp / "hostile.html", alerts_for)


class _Outline(HTMLParser):
    """What the checks read: every element (tag, attributes), the top-level sections in order,
    the parts of each instance section, the metric figures, the alert rows and the text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.sections: list[dict[str, Any]] = []
        self.alert_rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        self.elements.append((tag, attributes))
        section = self.sections[-1] if self.sections else None
        if "data-section" in attributes:
            self.sections.append(
                {
                    "kind": attributes["data-section"],
                    "instance": attributes.get("data-instance"),
                    "parts": [],
                    "figures": [],
                    "classes": [],
                }
            )
        elif section is not None:
            if "data-part" in attributes:
                section["parts"].append(attributes["data-part"])
            if tag == "figure":
                section["figures"].append(attributes)
            if "class" in attributes:
                section["classes"].extend(f"{tag}.{name}" for name in attributes["class"].split())
            if section["kind"] == "alerts" and tag == "tr":
                self.alert_rows.append([])
            if section["kind"] == "alerts" and tag == "td":
                self._cell = []
        self._style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.alert_rows[-1].append("".join(self._cell).strip())
            self._cell = None
        self._style = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if not self._style:
            self.text.append(data)


def _outline(html: str) -> _Outline:
    parser = _Outline()
    parser.feed(html)
    parser.close()
    return parser


# --- the document --------------------------------------------------------------------------------


def test_alerts_come_first_then_every_instance_with_its_parts(page: Page) -> None:
    outline = _outline(page.html)
    kinds = [section["kind"] for section in outline.sections]
    assert kinds[:2] == ["alerts", "overview"], kinds
    instance_sections = [s for s in outline.sections if s["kind"] == "instance"]
    assert kinds[2:] == ["instance"] * len(instance_sections)
    assert [s["instance"] for s in instance_sections] == page.instances
    assert len(page.instances) == 12
    for section in instance_sections:
        assert section["parts"] == PARTS, section["instance"]

    rows = [row for row in outline.alert_rows if row]
    assert [(row[0], row[1]) for row in rows] == [(a.kind, a.instance) for a in page.alerts]
    assert all(row[3] == alert.message for row, alert in zip(rows, page.alerts, strict=True))
    values = {alert.kind: row[4] for row, alert in zip(rows, page.alerts, strict=True)}
    assert values["load_freshness"] == "30.5 h vs 24.0 h"
    assert values["failure_streak"] == "3 vs 3"
    assert re.fullmatch(r"\S+: [0-9.e+-]+ vs [0-9.e+-]+ \(-23\.1%\)", values["metric_regression"])


def test_a_metric_regression_is_marked_in_its_instance(page: Page) -> None:
    alert = next(a for a in page.alerts if a.kind == "metric_regression")
    section = next(s for s in _outline(page.html).sections if s["instance"] == alert.instance)
    figures = {figure["data-metric"]: figure["class"].split() for figure in section["figures"]}
    assert "regressed" in figures[alert.metric], figures
    assert [name for name, classes in figures.items() if "regressed" in classes] == [alert.metric]
    assert "circle.regress" in section["classes"], "the run the alert fired on is not ringed"
    assert "line.baseline" in section["classes"], "the alert's baseline is not drawn"
    assert "badge" in " ".join(section["classes"]), "the instance shows no alert badge"


def test_the_alerts_models_alerts_are_shown_and_marked(demo_db: Path) -> None:
    """analytics.training_alerts' own alerts (read_alerts): every one listed, and every metric
    regression marked on its metric's chart (the alert names metrics as the trends do)."""
    with connect_models(demo_db, read_only=True) as con:
        alerts = read_alerts(con)
        html = render_html(con, alerts)
    regressions = [alert for alert in alerts if alert.kind == "metric_regression"]
    assert regressions, "the demo's data raises no metric regression: pick another world"
    outline = _outline(html)
    assert len([row for row in outline.alert_rows if row]) == len(alerts)
    sections = {s["instance"]: s for s in outline.sections if s["kind"] == "instance"}
    for alert in regressions:
        figures = {f["data-metric"]: f["class"].split() for f in sections[alert.instance]["figures"]}
        assert "regressed" in figures.get(alert.metric or "", []), (
            alert.instance,
            alert.metric,
            figures,
        )
    ringed = sum(c == "circle.regress" for s in sections.values() for c in s["classes"])
    assert ringed == len(regressions), "each regression's run is ringed once"


def test_metric_values_match_the_models(demo_db: Path) -> None:
    """The per-run values drawn are the models': from the staging view when there is one, parsed
    from extend_info otherwise (both agree), the newest equal to latest_training_metrics."""
    with connect_models(demo_db, read_only=True) as con:
        parsed = metric_series(con, from_extend_info=True)
        drawn = metric_series(con)
        latest = _rows(con, "select * from analytics.latest_training_metrics")
    assert latest
    assert drawn == parsed
    for row in latest:
        key = (row["app_group"], row["function_name"], row["instance_name"])
        newest = parsed[key][row["metric_name"]][-1]
        assert (newest.run_id, newest.value) == (row["run_id"], row["metric_value"]), row
    assert all(1 <= len(points) <= 21 for metrics in parsed.values() for points in metrics.values())


def test_the_page_references_nothing_outside_the_file(page: Page) -> None:
    outline = _outline(page.html)
    tags = {tag for tag, _ in outline.elements}
    assert not tags & {"script", "link", "iframe", "frame", "object", "embed", "img", "video", "audio"}
    assert not tags & {"form", "base", "source", "track", "image", "use", "foreignobject"}
    for tag, attributes in outline.elements:
        for name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data", "background"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith(("#", "data:")), (tag, name, value)
        assert not any(name.startswith("on") for name in attributes), (tag, attributes)
    lowered = page.html.lower()
    assert "<script" not in lowered and "@import" not in lowered
    assert all(
        lowered.startswith("data:", match.end()) for match in re.finditer(r"url\(\s*['\"]?", lowered)
    )
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", lowered)
    csp = next(
        a["content"] for t, a in outline.elements if a.get("http-equiv") == "Content-Security-Policy"
    )
    assert "default-src 'none'" in csp
    viewport = next(a["content"] for t, a in outline.elements if a.get("name") == "viewport")
    assert "width=device-width" in viewport


def test_the_demo_report_is_small(page: Page) -> None:
    size = len(page.html.encode())
    assert size < MAX_BYTES, f"the demo's report is {size} bytes: keep it under {MAX_BYTES}"


def test_text_from_the_api_is_escaped(hostile_page: Page) -> None:
    html = hostile_page.html
    assert EVIL_INSTANCE not in html and EVIL_MESSAGE not in html and EVIL_METRIC not in html
    assert "&lt;script&gt;" in html
    outline = _outline(html)
    tags = {tag for tag, _ in outline.elements}
    assert not tags & {"script", "img", "u"}, "markup from the data became elements"
    instance = next(s for s in outline.sections if s["instance"] and EVIL_INSTANCE in s["instance"])
    assert instance["parts"] == PARTS
    text = "".join(outline.text)
    assert EVIL_INSTANCE in text and EVIL_MESSAGE in text and EVIL_METRIC in text  # shown as text
    rows = [row for row in outline.alert_rows if row]
    assert rows[0][1].endswith(EVIL_INSTANCE) and rows[0][3] == EVIL_MESSAGE


def test_a_long_history_is_drawn_by_week_in_the_models_zone(hostile_page: Page, page: Page) -> None:
    heading = r'data-part="success-rate"><h3>Success rate by (\w+) \(([^)]*)\)'
    assert set(re.findall(heading, page.html)) == {("day", "UTC")}
    units = sorted(re.findall(heading, hostile_page.html))
    assert units == [("day", "Asia/Shanghai")] * (len(units) - 1) + [("week", "Asia/Shanghai")], units


def test_no_tasks_yet(demo_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "empty.duckdb"
    shutil.copyfile(demo_db, db)
    with duckdb.connect(str(db)) as con:
        con.execute("delete from opensearch_tasks.function_tasks")
    with connect_models(db, read_only=True) as con:
        html = render_html(con, [])
    sections = [section["kind"] for section in _outline(html).sections]
    assert sections == ["alerts", "overview"]
    assert "No alerts firing." in html and "No training tasks loaded yet." in html


def test_missing_models_fail_with_the_fix() -> None:
    with duckdb.connect() as con, pytest.raises(ModelsNotBuiltError, match="opensearch-tasks models"):
        render_html(con, [])


# --- in the browser ----------------------------------------------------------------------------------


def _chromium() -> Path:
    """The browser, or the test fails (never skips) saying how to install it."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} is missing: `make browser` installs Debian's chromium, which this test "
            "opens the HTML report in",
            pytrace=False,
        )
    return CHROMIUM


@dataclass
class Opened:
    console: list[str]  # the page's console messages (and uncaught errors, failed loads)
    requests: list[str]  # what the page asked the network for
    stdout: str


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page (not Chromium itself) requested, from a NetLog file."""
    text = netlog.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # cut short: close the events list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = []
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") != start_job or "url" not in params:
            continue
        from_page = (
            "file://" in str(params.get("network_isolation_key", ""))
            or params.get("initiator") == "null"
            or str(params.get("initiator", "")).startswith("file:")
        )
        if from_page and not params["url"].startswith(("file:", "data:")):
            requests.append(params["url"])
    return requests


def _open(chromium: Path, page: Path, work: Path, *action: str) -> Opened:
    """Open ``page`` in headless Chromium with a fresh profile; ``action``: --screenshot=... or
    --dump-dom, with --window-size."""
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    command = [
        str(chromium),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={work / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--log-net-log={netlog}",
        *action,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    console = [line for line in done.stderr.splitlines() if CONSOLE_LINE.search(line)]
    return Opened(console, _page_requests(netlog), done.stdout)


def _assert_not_blank(png: Path, size: tuple[int, int]) -> None:
    """Drawn: the window's size, many colours, a fair share of ink, ink at the top, and the red of
    the alerts box in the top third (alerts come first)."""
    from matplotlib import image

    pixels = np.asarray(image.imread(png))[..., :3]
    if pixels.dtype != np.uint8:
        pixels = (pixels * 255).round().astype(np.uint8)
    width, height = size
    assert pixels.shape[:2] == (height, width), pixels.shape
    flat = pixels.reshape(-1, 3).astype(np.uint32)
    colours = np.unique(flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2])
    assert len(colours) > 50, f"{png.name}: only {len(colours)} colours"
    ink = (pixels < 235).any(axis=2)
    assert 0.04 < ink.mean() < 0.9, f"{png.name}: {ink.mean():.1%} of the pixels are not white"
    assert ink[: height // 4].mean() > 0.03, f"{png.name}: the top of the page is blank"
    top = pixels[: height // 3].astype(int)
    red = (top[..., 0] > 170) & (top[..., 1] < 90) & (top[..., 2] < 90)
    assert red.sum() > 200, f"{png.name}: no alerts box (red) at the top"


def test_chromium_reports_what_goes_wrong_in_a_page(tmp_path: Path) -> None:
    """The canary: without it, a change in Chromium's logging would make the checks below pass
    without looking at anything."""
    chromium = _chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><p>canary</p>"
        "<img src='http://127.0.0.1:9/canary.png'>"
        "<script>console.error('canary console error'); missingFunction();</script></body></html>",
        encoding="utf-8",
    )
    opened = _open(chromium, bad, tmp_path / "run", "--dump-dom", "--window-size=800,600")
    console = "\n".join(opened.console)
    assert "canary console error" in console and "missingFunction" in console, opened.console
    assert opened.requests == ["http://127.0.0.1:9/canary.png"], opened.requests
    assert "canary" in opened.stdout


@pytest.mark.parametrize("device", list(VIEWPORTS))
def test_the_report_renders_in_chromium(page: Page, device: str) -> None:
    chromium = _chromium()
    width, height = VIEWPORTS[device]
    screenshot = page.path.parent / f"report-{device}.png"
    opened = _open(
        chromium,
        page.path,
        page.path.parent / f"chromium-{device}",
        f"--screenshot={screenshot}",
        f"--window-size={width},{height}",
    )
    assert opened.console == [], "the page logged to the console:\n" + "\n".join(opened.console)
    assert opened.requests == [], f"the page requested {opened.requests}"
    _assert_not_blank(screenshot, (width, height))
    if device == "laptop" and os.environ.get("UPDATE_REPORT_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)


def test_hostile_text_runs_nothing_in_chromium(hostile_page: Page) -> None:
    """Escaped markup stays text: no script runs, no image loads, and no CSP violation is logged."""
    chromium = _chromium()
    opened = _open(
        chromium,
        hostile_page.path,
        hostile_page.path.parent / "chromium",
        "--dump-dom",
        "--window-size=1280,900",
    )
    assert opened.console == [] and opened.requests == [], (opened.console, opened.requests)
    assert "&lt;script&gt;alert" in opened.stdout


def test_the_report_fits_a_phone_screen(page: Page) -> None:
    """Nothing makes the page wider than a 390 px phone: wide tables scroll inside their box and
    charts shrink. Measured in a copy with a one-line script (the report itself runs none), as
    headless Chromium lays out --dump-dom pages at 500 px at least, the root is set to 390 px."""
    chromium = _chromium()
    probe = page.path.parent / "layout-probe.html"
    script = (
        "<script>document.documentElement.style.width='390px';"
        "document.body.setAttribute('data-layout',JSON.stringify({width:document.body.scrollWidth}))"
        "</script></body>"
    )
    html = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.html)
    probe.write_text(html.replace("</body>", script), encoding="utf-8")
    opened = _open(
        chromium, probe, page.path.parent / "chromium-probe", "--dump-dom", "--window-size=390,2000"
    )
    found = re.search(r'data-layout="([^"]*)"', opened.stdout)
    assert found, "the layout probe did not run"
    layout = json.loads(found.group(1).replace("&quot;", '"'))
    assert layout["width"] <= 390, f"the page is {layout['width']} px wide on a 390 px screen"
