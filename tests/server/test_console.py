"""The web console. Its files through the app (TestClient), and the page in a real browser: the
system's headless Chromium driven by Playwright (never a downloaded browser) against real server
processes on loopback, one open and one that needs a classify token.

``PIGGYBACK_CONSOLE_SCREENSHOT=docs/img/console.png`` writes the README's screenshot; without
a browser the browser tests skip, unless ``PIGGYBACK_REQUIRE_BROWSER`` is set (CI sets it)."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from piggyback_core import FileSystemStore, load_backbone
from tests.conftest import SMALL, make_task
from tests.live import LiveServer
from tests.server.conftest import AppFactory

CHROMIUM = Path(os.environ.get("PIGGYBACK_CHROMIUM", "/usr/bin/chromium"))
# no sandbox (CI runs as root), no GPU, and nothing that reaches for the network by itself
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
CLASSIFY_TOKEN = "console-classify-token-0123"
TASKS = {
    "birds": ["robin", "sparrow", "blue tit", "wren", "goldfinch", "starling"],
    "flowers": ["daisy", "dandelion", "rose", "sunflower", "tulip"],
    "scenes": ["beach", "forest", "mountain", "city", "desert", "lake", "meadow"],
}
ROOT = Path(__file__).resolve().parents[2]
CONSOLE = ROOT / "server" / "console"


def photo() -> bytes:
    """A small colourful PNG (a sunset-ish gradient with a disc), the image the tests drop."""
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    pixels = np.stack([200 + 55 * np.sin(x / 40), 90 + 80 * (y / 96), 160 - 120 * (y / 96)], axis=-1)
    pixels[(x - 84) ** 2 + (y - 40) ** 2 < 18**2] = (255, 214, 90)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PHOTO = photo()


# --- the files, through the app --------------------------------------------------------------------


def test_the_root_sends_a_browser_to_the_console_whose_files_carry_a_strict_policy(app_client: AppFactory) -> None:
    with app_client() as client:
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "console/"
        page = client.get("/")
        assert page.status_code == 200 and page.url.path == "/console/"
        assert "text/html" in page.headers["content-type"]
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe" not in policy
        # no inline script or style and nothing from another origin: every file the page names is served here
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) and " style=" not in page.text
        names = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"app.js", "style.css"} <= set(names)
        for name in (n for n in names if not n.startswith("data:")):
            asset = client.get(f"/console/{name}")
            assert asset.status_code == 200 and asset.headers["x-content-type-options"] == "nosniff", name
        imports = re.findall(r'from "\./([^"]+)"', client.get("/console/app.js").text)
        assert imports == ["metrics.js"] and client.get("/console/metrics.js").status_code == 200
        assert client.get("/console/nothing.js").json() == {"detail": "Not Found"}
        assert client.get("/console", follow_redirects=True).url.path == "/console/"
        schema = client.get("/openapi.json").json()
        assert "/" not in schema["paths"] and not [p for p in schema["paths"] if p.startswith("/console")]


def test_the_console_is_framework_free_and_names_nothing_outside_the_server() -> None:
    for path in CONSOLE.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//cdn|\bimport\s.*from\s+\"(?!\./)", text), path.name
        assert ".innerHTML" not in text, path.name  # server text (labels, messages) only as textContent


# --- the page, in a browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = None
    if not CHROMIUM.exists():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    elif importlib.util.find_spec("playwright") is None:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("PIGGYBACK_REQUIRE_BROWSER"):
            pytest.fail(missing)
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two servers over one store of three tasks, started together: one open, one that needs a
    classify token."""
    store_dir = tmp_path_factory.mktemp("console-store")
    store, backbone = FileSystemStore(store_dir), load_backbone("resnet18", weights="random")
    for seed, (name, labels) in enumerate(TASKS.items()):
        # heads ten times the usual scale: answers that differ from task to task, not near-uniform
        task = make_task(backbone, name, labels=labels, num_labels=len(labels), seed=seed, preprocessing=SMALL,
                         head_scale=0.5)  # fmt: skip
        store.put(name, task.to_bytes())
    started = {
        "open": LiveServer(store_dir, max_wait_ms=2),
        "token": LiveServer(store_dir, max_wait_ms=2, classify_token=CLASSIFY_TOKEN),
    }
    try:
        yield {kind: server.wait_ready().url for kind, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@dataclass
class Page:
    """A page and what went wrong on it: console errors, uncaught exceptions, failed requests and
    error answers."""

    page: Any
    problems: list[str] = field(default_factory=list)

    def bars(self, task: str) -> list[tuple[str, float, str]]:
        """``task``'s bars: label, score (exact) and the score shown."""
        bars = self.page.locator(f'.result[data-task="{task}"] .bar').all()
        return [(b.get_attribute("data-label"), float(b.get_attribute("data-score")), b.locator(".score").inner_text())
                for b in bars]  # fmt: skip

    def until(self, condition: str, arg: Any = None) -> None:
        """Wait until the JavaScript expression ``condition`` (of ``arg``) holds. As a function: the
        page's policy forbids eval, which Playwright uses for a bare expression."""
        self.page.wait_for_function(f"arg => ({condition})", arg=arg)

    def stat(self, name: str) -> float:
        return float(self.page.locator(f'#stats [data-stat="{name}"]').get_attribute("data-value"))


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[str], Page]]:
    contexts = []

    def open_(url: str) -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 760})
        contexts.append(context)
        watched = Page(context.new_page())
        report = watched.problems.append
        watched.page.on("console", lambda m: report(f"console {m.type}: {m.text}") if m.type == "error" else None)
        watched.page.on("pageerror", lambda e: report(f"page error: {e}"))
        watched.page.on("requestfailed", lambda r: report(f"request failed: {r.url} {r.failure}"))
        watched.page.on("response", lambda r: report(f"{r.status} {r.url}") if r.status >= 400 else None)
        watched.page.goto(url)
        return watched

    yield open_
    for context in contexts:
        context.close()


def classify_alone(url: str, task: str, top_k: int = 5, token: str | None = None) -> list[tuple[str, float]]:
    headers = {"Content-Type": "image/png"} | ({"Authorization": f"Bearer {token}"} if token else {})
    r = httpx.post(f"{url}/classify/{task}", params={"top_k": top_k}, content=PHOTO, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return [(p["label"], p["score"]) for p in r.json()["predictions"]]


def assert_bars_match(page: Page, task: str, want: list[tuple[str, float]]) -> None:
    got = page.bars(task)
    assert [label for label, _, _ in got] == [label for label, _ in want]
    for (_, score, shown), (_, expected) in zip(got, want, strict=True):
        assert abs(score - expected) < 1e-4  # the mixed batch against the task alone
        assert abs(float(shown.rstrip("%")) - 100 * expected) <= 0.05 + 1e-6  # shown to 0.1 %


def wait_for_tasks(page: Page) -> None:
    page.until(
        "document.querySelectorAll('#tasks tbody tr').length === arg"
        " && ![...document.querySelectorAll('#tasks td.size')].some(td => td.textContent === '…')",
        arg=len(TASKS),
    )


def test_the_console_loads_with_no_error_and_lists_every_task(servers: dict[str, str], open_page: Callable) -> None:
    url = servers["open"]
    page = open_page(f"{url}/")
    assert page.page.url == f"{url}/console/"
    wait_for_tasks(page)
    rows = page.page.locator("#tasks tbody tr")
    assert [rows.nth(i).get_attribute("data-task") for i in range(rows.count())] == sorted(TASKS)
    for name in TASKS:
        task = httpx.get(f"{url}/tasks/{name}").json()
        row = page.page.locator(f'#tasks tr[data-task="{name}"]')
        assert row.locator(".labels").get_attribute("title") == ", ".join(task["labels"])
        assert row.locator(".version").get_attribute("title") == task["version"]
        assert row.locator(".size").inner_text().endswith(("KiB", "MiB"))
        resident = row.locator(".resident").inner_text()
        assert resident == ("pinned" if task["residency"]["pinned"] else "no") or (
            resident.startswith("yes") and task["residency"]["built_bytes"] > 0
        )
    page.until("document.querySelector('[data-stat=tasks]').dataset.value === '3'")
    server_line = page.page.locator("#server").inner_text()
    assert server_line.startswith("resnet18 · cpu")
    assert page.problems == []


def test_a_picked_image_draws_the_bars_that_classify_answers(servers: dict[str, str], open_page: Callable) -> None:
    url = servers["open"]
    page = open_page(f"{url}/console/")
    wait_for_tasks(page)
    first = sorted(TASKS)[0]  # chosen at start
    page.page.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": PHOTO}])
    page.page.wait_for_selector(f'.result[data-task="{first}"] .bar')
    assert page.page.locator(".result").count() == 1
    assert_bars_match(page, first, classify_alone(url, first))
    page.page.fill("#top-k", "3")
    page.page.dispatch_event("#top-k", "change")
    page.until(f"document.querySelectorAll('.result[data-task=\"{first}\"] .bar').length === 3")
    assert_bars_match(page, first, classify_alone(url, first, top_k=3))
    assert page.page.locator("#preview").is_visible()
    assert page.problems == []


DROP = """async ([data, how]) => {
    const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], "photo.png", { type: "image/png" }));
    const event = how === "drop"
        ? new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true })
        : new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true });
    document.querySelector(how === "drop" ? "#drop" : "body").dispatchEvent(event);
}"""


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_a_dropped_or_pasted_image_with_several_tasks_draws_every_tasks_answer(
    servers: dict[str, str], open_page: Callable, how: str
) -> None:
    url = servers["open"]
    page = open_page(f"{url}/console/?refresh=0.3")
    wait_for_tasks(page)
    for name in sorted(TASKS)[1:]:
        page.page.check(f'#tasks tr[data-task="{name}"] input[type=checkbox]')
    page.page.evaluate(DROP, [base64.b64encode(PHOTO).decode(), how])
    page.until(f"document.querySelectorAll('.result .bar').length === {5 * len(TASKS)}")
    cards = page.page.locator(".result")
    assert [cards.nth(i).get_attribute("data-task") for i in range(cards.count())] == sorted(TASKS)
    assert f"{len(TASKS)} tasks" in cards.first.locator(".latency").inner_text()
    for name in TASKS:
        assert_bars_match(page, name, classify_alone(url, name))
    page.page.uncheck(f'#tasks tr[data-task="{sorted(TASKS)[0]}"] input[type=checkbox]')
    page.until(f"document.querySelectorAll('.result').length === {len(TASKS) - 1}")
    assert page.problems == []
    if how == "drop":
        page.page.check(f'#tasks tr[data-task="{sorted(TASKS)[0]}"] input[type=checkbox]')
        page.until(f"document.querySelectorAll('.result').length === {len(TASKS)}")
        page.until("document.querySelector('[data-stat=throughput]').dataset.value > 0")
        target = os.environ.get("PIGGYBACK_CONSOLE_SCREENSHOT")
        if target:
            page.page.screenshot(path=str(ROOT / target), full_page=True)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile, written out plainly: the reference for the page's figures."""
    count = buckets[-1][1]
    rank = q * count
    lower, below = 0.0, 0.0
    for upper, seen in buckets:
        if seen >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / (seen - below)
        lower, below = upper, seen
    return lower


def test_the_live_panel_shows_the_servers_own_figures(servers: dict[str, str], open_page: Callable) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    url = servers["open"]
    for name in TASKS:
        classify_alone(url, name)
    assert httpx.post(f"{url}/classify/nobody", content=PHOTO, headers={"Content-Type": "image/png"}).status_code == 404
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    requests = [s for s in families["piggyback_requests"].samples if s.name.endswith("_total")]
    buckets: dict[float, float] = {}
    for s in families["piggyback_request_duration_seconds"].samples:
        if s.name.endswith("_bucket"):
            buckets[float(s.labels["le"])] = buckets.get(float(s.labels["le"]), 0.0) + s.value
    latency = sorted(buckets.items())
    page = open_page(f"{url}/console/?refresh=0.3")
    page.until("document.querySelector('[data-stat=requests]').dataset.value !== undefined")
    assert page.stat("requests") == sum(s.value for s in requests if s.labels["status"] == "200")
    assert page.stat("errors") == sum(s.value for s in requests if s.labels["status"] != "200") >= 1
    assert page.stat("p50") == pytest.approx(histogram_quantile(0.5, latency))
    assert page.stat("p99") == pytest.approx(histogram_quantile(0.99, latency))
    assert page.stat("queue") == 0
    hits, misses = (families[f"piggyback_weight_cache_{k}"].samples[0].value for k in ("hits", "misses"))
    assert page.stat("hit-rate") == pytest.approx(hits / (hits + misses))
    assert page.page.locator("#stats-window").inner_text() == "latency since start"
    # traffic while the page watches: a throughput over the last scrapes, and the window's latency
    before = page.stat("requests")
    for _ in range(4):
        classify_alone(url, "birds")
    page.until(f"document.querySelector('[data-stat=requests]').dataset.value == {before + 4}")
    assert page.stat("throughput") > 0
    assert page.page.locator("#stats-window").inner_text().startswith("last ")
    assert page.problems == []


def test_a_wrong_token_shows_the_servers_message_and_the_right_one_classifies(
    servers: dict[str, str], open_page: Callable
) -> None:
    url = servers["token"]
    page = open_page(f"{url}/")
    message = page.page.locator("#token-message")
    page.page.wait_for_selector("#token-form:not([hidden])")
    missing = httpx.get(f"{url}/tasks").json()["detail"]
    page.until("document.querySelector('#token-message').textContent === arg", missing)
    page.page.fill("#token", "not-the-token")
    page.page.click("#token-form button")
    wrong = httpx.get(f"{url}/tasks", headers={"Authorization": "Bearer not-the-token"}).json()["detail"]
    assert wrong != missing
    page.until("document.querySelector('#token-message').textContent === arg", wrong)
    assert message.inner_text() == wrong and page.page.locator("#tasks tbody tr").count() == 0
    page.page.fill("#token", CLASSIFY_TOKEN)
    page.page.click("#token-form button")
    wait_for_tasks(page)
    assert page.page.locator("#token-form").is_hidden() and page.page.locator("#error").is_hidden()
    first = sorted(TASKS)[0]
    page.page.set_input_files("#image", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": PHOTO}])
    page.page.wait_for_selector(f'.result[data-task="{first}"] .bar')
    assert_bars_match(page, first, classify_alone(url, first, token=CLASSIFY_TOKEN))
    # what went wrong on the way is the two refusals, and nothing else
    assert page.problems and all("401" in p for p in page.problems), page.problems
