"""The dashboard at /ui as a person uses it: Debian's chromium, driven by Playwright, against the
real server with --api-key, the embedded demo model and its job worker training for real.

Playwright cannot download its own browsers here, so it launches /usr/bin/chromium; the tests
skip where that is missing (`.ci/run` installs it). Every page records its console errors and
any request to another host, and each test ends by checking there were none.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from mlx_core.demo import resolve_model_path
from mlx_core.lora.formats import save_adapter
from mlx_core.weights import load_model
from server.settings import Settings
from tests.engine.test_lora import random_adapter
from tests.serving import start_model_server

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KEY = "ui-test-key"
ANY = re.compile(".*")
# Chromium without anything that phones home, so "no request to another host" is the page's own.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIKISQL = Path("/work/shared/data/wikisql")
if not WIKISQL.is_dir():  # CI has shared/ beside the clone instead
    WIKISQL = Path(__file__).resolve().parents[3] / "shared/data/wikisql"
# The docs' screenshot (docs/ui.png) is this test's: `LORAFORGE_UI_SCREENSHOT=docs/ui.png pytest
# tests/server/test_ui.py` refreshes it; other runs write to a temporary file, so running the
# tests leaves the checkout as it was.
SCREENSHOT_ENV = "LORAFORGE_UI_SCREENSHOT"
PROMPT = (
    "table: 1-10015132-16\ncolumns: Player, No., Nationality, Position, Years in Toronto, "
    "School/Club Team\nQ: How many players have position of Guard?\nA:"
)


@dataclass
class Watched:
    """A browser page and what it did that a user would not want: console errors, requests
    to any other host than the server."""

    page: playwright_api.Page
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    settings = Settings(api_key=KEY, data_dir=tmp_path_factory.mktemp("data"), log_level="warning")
    with start_model_server(settings) as (url, _engine):
        yield url


@pytest.fixture(scope="module")
def open_server(tmp_path_factory) -> Iterator[str]:
    """A server without --api-key (and without a worker: nothing trains here)."""
    data = tmp_path_factory.mktemp("open-data")
    settings = Settings(data_dir=data, start_worker=False, log_level="warning")
    with start_model_server(settings) as (url, _engine):
        yield url


@pytest.fixture(scope="module")
def browser(server, open_server) -> Iterator[playwright_api.Browser]:
    # The servers start first: Playwright's sync API keeps an event loop running in this thread,
    # and start_model_server waits for the model with anyio.run, which cannot run inside one.
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser: playwright_api.Browser, server: str) -> Watched:
    """A fresh tab (its own session storage) with the dashboard loaded."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    watched = Watched(page)
    host = urlsplit(server).netloc

    def on_console(message: playwright_api.ConsoleMessage) -> None:
        if message.type == "error":
            watched.errors.append(message.text)

    def on_request(request: playwright_api.Request) -> None:
        if not request.url.startswith("data:") and urlsplit(request.url).netloc != host:
            watched.foreign.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    context.on("request", on_request)
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete X?" confirmations
    page.goto(f"{server}/ui")
    return watched


@pytest.fixture(scope="module")
def dashboard(browser, server) -> Iterator[Watched]:
    """One tab, unlocked with the key, shared by the tests below in file order."""
    watched = open_page(browser, server)
    page = watched.page
    page.get_by_test_id("api-key-input").fill(KEY)
    page.get_by_test_id("api-key-submit").click()
    playwright_api.expect(page.get_by_test_id("model-row").first).to_be_visible()
    yield watched
    page.context.close()


@pytest.fixture
def page(dashboard) -> Iterator[playwright_api.Page]:
    yield dashboard.page
    dashboard.assert_clean()


def expect(locator):
    return playwright_api.expect(locator)


def test_the_page_is_public_and_loads_nothing_from_elsewhere(server):
    r = httpx.get(f"{server}/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert '<meta name="loraforge-auth" content="required">' in r.text
    # Every script, stylesheet and icon the page names is its own (or an inline data: icon).
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(ref.startswith(("/ui/", "data:")) for ref in refs), refs
    for ref in refs:
        if ref.startswith("/ui/"):
            assert httpx.get(f"{server}{ref}").status_code == 200
    assert httpx.get(f"{server}/ui/../app.py").status_code == 404
    assert httpx.get(f"{server}/v1/models").status_code == 401  # the API still needs the key


def test_the_key_prompt_shows_nothing_else_until_the_key_is_right(browser, server):
    watched = open_page(browser, server)
    page = watched.page
    expect(page.get_by_test_id("api-key-input")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.get_by_test_id("model-row").count() == 0

    page.get_by_test_id("api-key-input").fill("wrong")
    page.get_by_test_id("api-key-submit").click()
    expect(page.locator("#key-error")).to_contain_text("Incorrect API key")
    expect(page.locator("#dashboard")).to_be_hidden()
    # The refused key is the only thing the browser complained about (its 401s).
    assert watched.errors and all("401" in e for e in watched.errors), watched.errors
    watched.errors.clear()

    page.get_by_test_id("api-key-input").fill(KEY)
    page.get_by_test_id("api-key-submit").click()
    expect(page.get_by_test_id("model-row").first).to_be_visible()
    expect(page.get_by_test_id("api-key-input")).to_be_hidden()
    page.reload()  # the key is kept for the tab's session
    expect(page.get_by_test_id("model-row").first).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('loraforge.apiKey')") == KEY
    watched.assert_clean()
    page.context.close()


def test_without_a_key_the_dashboard_opens_at_once(browser, open_server):
    watched = open_page(browser, open_server)
    expect(watched.page.get_by_test_id("model-row")).to_have_count(1)
    expect(watched.page.get_by_test_id("api-key-input")).to_be_hidden()
    expect(watched.page.locator("#forget-key")).to_be_hidden()
    watched.assert_clean()
    watched.page.context.close()


def adapter_archive(tmp_path: Path, rank: int, seed: int) -> Path:
    """A loraforge adapter for the demo model, packed as a user would (tar czf)."""
    args = load_model(resolve_model_path(None)).args
    folder = save_adapter(
        tmp_path / f"adapter-{seed}", random_adapter(args, ("q_proj", "v_proj"), (2, 3), rank, seed)
    )
    path = tmp_path / f"sql-r{rank}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=".")
    return path


def test_model_rows_and_adapter_upload_and_delete(page, tmp_path):
    rows = page.get_by_test_id("model-row")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("loraforge-demo")
    expect(rows.first).to_contain_text("base")

    for rank, name in ((4, "sql-r4"), (2, "scratch")):
        page.get_by_test_id("adapter-name").fill(name if name == "scratch" else "")
        page.get_by_test_id("adapter-upload").set_input_files(adapter_archive(tmp_path, rank, rank))
        page.get_by_test_id("adapter-upload-submit").click()
        # Named after the archive when no name is given; rank, format and residency shown.
        cells = rows.filter(has_text=name).locator("td")
        expect(cells).to_have_text([name, "adapter", str(rank), "loraforge", "no", ANY, ANY])
    expect(rows).to_have_count(3)

    rows.filter(has_text="scratch").get_by_test_id("adapter-delete").click()
    expect(rows).to_have_count(2)
    expect(rows.filter(has_text="scratch")).to_have_count(0)
    assert "sql-r4" in page.locator("[data-testid=try-model] option").all_inner_texts()


def test_try_it_streams_an_answer(page):
    page.get_by_test_id("try-model").select_option("sql-r4")
    page.get_by_test_id("try-model").select_option("loraforge-demo")
    page.get_by_test_id("try-prompt").fill(PROMPT)
    page.get_by_test_id("try-sql").check()
    # Count the pieces of text as they land: a streamed answer arrives in several.
    page.evaluate(
        """() => {
        window.pieces = 0;
        new MutationObserver((changes) => (window.pieces += changes.length))
            .observe(document.querySelector("[data-testid=try-output]"), {childList: true});
    }"""
    )
    page.get_by_test_id("try-send").click()
    expect(page.get_by_test_id("try-status")).to_contain_text("finish_reason: stop")
    answer = page.get_by_test_id("try-output").inner_text()
    assert answer.startswith(" SELECT") and "FROM 1-10015132-16" in answer, answer
    assert page.evaluate("window.pieces") > 3


def wikisql_file(tmp_path: Path, split: str, n: int) -> Path:
    lines = (WIKISQL / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(lines[:n]), encoding="utf-8")
    return path


def series_points(page: playwright_api.Page, series: str) -> int:
    polyline = page.locator(f"[data-testid=loss-chart] polyline[data-series={series}]")
    if polyline.count() == 0:
        return 0
    return len((polyline.get_attribute("points") or "").split())


def test_a_job_from_an_uploaded_file_trains_live_and_is_cancelled(page, tmp_path):
    for split, n in (("valid", 4), ("train", 40)):
        page.get_by_test_id("file-upload").set_input_files(wikisql_file(tmp_path, split, n))
        page.get_by_test_id("file-upload-submit").click()
        expect(page.get_by_test_id("file-row").filter(has_text=f"{split}.jsonl")).to_have_count(1)

    # 40 examples x 15 epochs / batch 2 = 300 steps: long enough to watch and cancel.
    for field_id, name in (
        ("job-training-file", "train.jsonl"),
        ("job-validation-file", "valid.jsonl"),
    ):
        select = page.get_by_test_id(field_id)
        select.select_option(select.locator("option", has_text=name).get_attribute("value"))
    page.get_by_test_id("job-suffix").fill("ui")
    page.get_by_test_id("job-epochs").fill("15")
    page.get_by_test_id("job-batch-size").fill("2")
    page.get_by_test_id("job-lr").fill("20")
    page.get_by_test_id("job-lora-rank").fill("4")
    page.get_by_test_id("job-lora-layers").fill("2")
    page.get_by_test_id("job-create").click()

    row = page.get_by_test_id("job-row").first
    expect(row.get_by_test_id("job-status")).to_have_text(re.compile("queued|running"))
    expect(row.get_by_test_id("job-status")).to_have_text("running", timeout=30_000)
    settings = page.locator("#detail-settings")
    for name, value in (("epochs", "15"), ("batch size", "2"), ("learning-rate multiplier", "20")):
        expect(settings.locator(f"dd[data-setting='{name}']")).to_have_text(value)
    expect(settings.locator("dd[data-setting='LoRA rank / alpha']")).to_have_text("4 / 16")
    expect(settings.locator("dd[data-setting='LoRA layers']")).to_have_text("2")

    # The loss curve grows while the job trains, without a reload.
    chart = page.get_by_test_id("loss-chart")
    expect(chart.locator("polyline[data-series=train]")).to_have_count(1, timeout=30_000)
    seen = [series_points(page, "train")]
    deadline = time.monotonic() + 60
    while seen[-1] < 80:  # a quarter of the run: enough curve for the docs' screenshot
        assert time.monotonic() < deadline, f"the loss chart stopped growing: {seen}"
        page.wait_for_timeout(250)
        seen.append(series_points(page, "train"))
    assert len(set(seen)) >= 3, seen  # it grew in several updates, not at once
    expect(chart.locator("polyline[data-series=valid]")).to_have_count(1, timeout=30_000)
    steps = chart.locator("[data-axis=step] text").all_text_contents()
    assert "0" in steps and "300" in steps, steps  # the x axis runs to the job's last step
    expect(row.get_by_test_id("job-progress")).to_have_text(re.compile(r"^\d+ / 300$"))
    expect(row.get_by_test_id("job-speed")).to_have_text(re.compile(r"^[\d,.]+$"))
    expect(row.get_by_test_id("job-eta")).to_have_text(re.compile(r"\d+ (s|min)"))
    expect(page.locator("#detail-events li").first).to_contain_text(re.compile("Step|Checkpoint"))
    target = os.environ.get(SCREENSHOT_ENV) or str(tmp_path / "ui.png")
    page.screenshot(path=target, full_page=True)
    assert Path(target).stat().st_size > 10_000

    row.get_by_test_id("job-cancel").click()
    expect(row.get_by_test_id("job-status")).to_have_text("cancelled")
    expect(row.get_by_test_id("job-cancel")).to_be_hidden()
    expect(page.locator("#detail-events")).to_contain_text("Job cancelled")

    # A second job from the same form: newest first, selected, and cancelled before it ends.
    page.get_by_test_id("job-suffix").fill("ui2")
    page.get_by_test_id("job-create").click()
    rows = page.get_by_test_id("job-row")
    expect(rows).to_have_count(2)
    expect(rows.first).to_contain_text("ui2")
    expect(rows.nth(1).get_by_test_id("job-status")).to_have_text("cancelled")
    expect(page.locator("#detail-id")).to_have_text(re.compile("^ftjob-"))
    assert page.locator("#detail-id").inner_text() in rows.first.inner_text()
    rows.first.get_by_test_id("job-cancel").click()
    expect(rows.first.get_by_test_id("job-status")).to_have_text("cancelled")
