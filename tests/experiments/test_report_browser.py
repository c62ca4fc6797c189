"""The HTML reports as a browser shows them: a tiny ``sharpness compare`` run and ``sharpness reproduce
least-squares --quick`` are opened in headless Chromium (a 1280×900 viewport), screenshotted, and checked for images
that did not load, text that overflows its table cell, a page that scrolls sideways, console errors, and requests
that leave the report's folder (a report must be self-contained: images embedded or beside the file, no network).

Needs the ``playwright`` Python package (the ``test`` extra) and a system Chromium (Debian: ``apt-get install
chromium``; ``playwright install`` is not used); the module skips when either is missing. The checker itself is
tested on hand-made broken pages, so a pass on the real reports means something.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not importable (test extra)", exc_type=ImportError
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)

# Flags a probe on the CI machine kind needed: without the background-networking ones Chromium's own connections are
# refused and it stalls; the sandbox does not work as root in a container.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 900}
STEP_TIMEOUT_MS = 20_000  # any one browser step (launch, load, screenshot)
TEST_DEADLINE_S = 90  # a whole test, in case the browser hangs where playwright's own timeouts do not apply
TINY_COMPARE = ["--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--threads", "1", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A 1×1 PNG, for the hand-made pages.
DOT_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)

# In the page: every <img> that did not load, every td/th whose content is wider (or taller) than the cell, and
# whether the document scrolls sideways. A table wider than the page inside a scrolling wrapper is fine (its cells
# are checked, not the page); pre blocks with overflow-x:auto scroll inside themselves.
_LAYOUT_JS = """() => {
  const describe = (el) => {
    const text = (el.innerText || el.getAttribute('src') || '').replace(/\\s+/g, ' ').trim();
    return text.length > 60 ? text.slice(0, 57) + '...' : text;
  };
  const images = [...document.images]
    .filter((img) => !(img.complete && img.naturalWidth > 0))
    .map((img) => img.getAttribute('src'));
  // A cell's content overflows when it is scrolled/clipped (scrollWidth) or, with overflow visible, when the boxes
  // of its text and children reach outside the cell's padding box (a long word in a fixed-width table).
  const sticksOut = (c) => {
    const box = c.getBoundingClientRect();
    const left = box.left + c.clientLeft, top = box.top + c.clientTop;
    const range = document.createRange();
    range.selectNodeContents(c);
    return [...range.getClientRects()].some((r) => r.width > 0 && (r.left < left - 1 || r.top < top - 1 ||
      r.right > left + c.clientWidth + 1 || r.bottom > top + c.clientHeight + 1));
  };
  const cells = [...document.querySelectorAll('td, th')]
    .filter((c) => c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1 || sticksOut(c))
    .map((c) => `${c.tagName.toLowerCase()} "${describe(c)}": content ${c.scrollWidth}x${c.scrollHeight} px ` +
                `in a ${c.clientWidth}x${c.clientHeight} px cell`);
  // A number or a word (a cell's whole text, letters, digits, '_', '.', ',', '%' and a sign: nowhere a line may
  // break) broken over two lines: its text boxes have different tops.
  const split = [...document.querySelectorAll('td, th')]
    .filter((c) => c.children.length === 0 && /^[-+]?[\\w.,%]+$/.test(c.textContent.trim()))
    .filter((c) => {
      const range = document.createRange();
      range.selectNodeContents(c);
      return new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top))).size > 1;
    })
    .map((c) => `${c.tagName.toLowerCase()} "${describe(c)}" is broken over lines`);
  const root = document.documentElement;
  return {images, cells, split, pageWidth: root.scrollWidth, viewWidth: root.clientWidth,
          imageCount: document.images.length};
}"""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; a no-op where that is unavailable)."""
    usable = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def _expired(signum, frame):
        raise TimeoutError(f"browser check took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_report(browser, html: Path, screenshot: Path) -> list[tuple[str, str]]:
    """Open ``html`` by file:// URL, screenshot the full page into ``screenshot``, and return its problems as
    ``(kind, detail)`` pairs; kinds: ``request`` (a request outside the report's folder: network, or a file elsewhere;
    blocked), ``console`` (console message of type error), ``pageerror`` (uncaught exception), ``image`` (an <img> that
    did not load), ``cell`` (content overflowing its td/th), ``split`` (a number or word in a cell broken over lines),
    ``page`` (the page scrolls sideways), ``screenshot``."""
    html = html.resolve()
    folder = html.parent
    problems: list[tuple[str, str]] = []

    def route(r) -> None:
        url = r.request.url
        scheme = urlparse(url).scheme
        if scheme == "data":
            r.continue_()
        elif scheme == "file" and Path(unquote(urlparse(url).path)).resolve().is_relative_to(folder):
            r.continue_()
        else:
            problems.append(("request", url))
            r.abort()

    context = browser.new_context(viewport=VIEWPORT, service_workers="block")
    try:
        context.set_default_timeout(STEP_TIMEOUT_MS)
        page = context.new_page()
        page.route("**/*", route)
        page.on("console", lambda m: problems.append(("console", m.text)) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(("pageerror", str(e))))
        page.goto(html.as_uri(), wait_until="load", timeout=STEP_TIMEOUT_MS)
        page.wait_for_load_state("networkidle", timeout=STEP_TIMEOUT_MS)
        page.screenshot(path=str(screenshot), full_page=True, timeout=STEP_TIMEOUT_MS)
        shot = screenshot.read_bytes() if screenshot.is_file() else b""
        if not (shot.startswith(PNG_MAGIC) and len(shot) > 1000):
            problems.append(("screenshot", f"{screenshot}: {len(shot)} bytes, not a PNG of the page"))
        layout = page.evaluate(_LAYOUT_JS)
    finally:
        context.close()
    problems += [("image", f"<img src={src!r}> did not load") for src in layout["images"]]
    problems += [("cell", detail) for detail in layout["cells"]]
    problems += [("split", detail) for detail in layout["split"]]
    if layout["pageWidth"] > layout["viewWidth"] + 1:
        problems.append(("page", f"scrolls sideways: {layout['pageWidth']} px wide in a {layout['viewWidth']} px view"))
    return problems


@pytest.fixture(scope="module")
def browser():
    with _deadline(TEST_DEADLINE_S):
        playwright = sync_api.sync_playwright().start()
    try:
        with _deadline(TEST_DEADLINE_S):
            launched = playwright.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=STEP_TIMEOUT_MS
            )
        try:
            yield launched
        finally:
            with _deadline(TEST_DEADLINE_S):
                launched.close()
    finally:
        with _deadline(TEST_DEADLINE_S):
            playwright.stop()


@pytest.fixture
def deadline() -> Iterator[None]:
    with _deadline(TEST_DEADLINE_S):
        yield


def _sharpness(*args: str) -> None:
    """The installed console script, as a user runs it."""
    script = Path(sys.executable).with_name("sharpness")
    result = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module", params=["compare", "least-squares"])
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny compare run (2 seeds × 2 epochs on the synthetic data) and the quick least-squares reproduction."""
    out = tmp_path_factory.mktemp("browser")
    if request.param == "compare":
        _sharpness("compare", *TINY_COMPARE, "--seeds", "2", "--out", str(out / "compare"))
        return out / "compare" / "report.html"
    _sharpness("reproduce", "least-squares", "--quick", "--out", str(out))
    return out / "least-squares" / "report.html"


def test_report_renders_cleanly(report: Path, browser, tmp_path: Path, deadline) -> None:
    assert 'src="' in report.read_text(), "the report shows no image"  # so that the image check checks something
    shot = tmp_path / "report.png"
    problems = check_report(browser, report, shot)
    assert not problems, f"{report} (screenshot {shot}):\n" + "\n".join(f"  {kind}: {d}" for kind, d in problems)


# Hand-made pages: a clean one, then one fault each that the checker must report.
_CLEAN = (
    "<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>"
    "<img src='dot.png' width='40'><img src='data:image/png;base64,{dot}' width='40'>"
    "<table style='table-layout:fixed;width:300px'><tr><th>run</th><td>0.25</td></tr></table>{extra}</body></html>"
)
_FAULTS = {
    "image": "<img src='missing.png'>",
    "cell": "<table style='table-layout:fixed;width:120px'><tr>"
    "<td>sam_rho0.05_seed0_aelooksam_with_a_long_unbreakable_name</td></tr></table>",
    "console": "<script>console.error('x')</script>",
    "pageerror": "<script>throw new Error('boom')</script>",
    "request": "<img src='http://example.invalid/figure.png'>",
    "page": "<div style='width:3000px'>wide</div>",
    "split": "<table style='width:60px'><tr><td style='overflow-wrap:anywhere'>0.0500000</td>"
    "<td style='overflow-wrap:anywhere'>94.43</td></tr></table>",
}


def _page(folder: Path, extra: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "dot.png").write_bytes(DOT_PNG)
    html = folder / "report.html"
    html.write_text(_CLEAN.format(dot=base64.b64encode(DOT_PNG).decode(), extra=extra))
    return html


def test_checker_passes_a_clean_page(browser, tmp_path: Path, deadline) -> None:
    assert check_report(browser, _page(tmp_path / "clean", ""), tmp_path / "clean.png") == []


@pytest.mark.parametrize("kind", sorted(_FAULTS))
def test_checker_reports_each_fault(kind: str, browser, tmp_path: Path, deadline) -> None:
    problems = check_report(browser, _page(tmp_path / kind, _FAULTS[kind]), tmp_path / f"{kind}.png")
    assert kind in {k for k, _ in problems}, problems


def test_checker_blocks_files_outside_the_report_folder(browser, tmp_path: Path, deadline) -> None:
    (tmp_path / "elsewhere.png").write_bytes(DOT_PNG)
    html = _page(tmp_path / "report", f"<img src='{(tmp_path / 'elsewhere.png').as_uri()}'>")
    problems = check_report(browser, html, tmp_path / "shot.png")
    assert ("request", (tmp_path / "elsewhere.png").as_uri()) in problems
    assert any(kind == "image" for kind, _ in problems), problems


def test_the_report_style_keeps_numbers_whole_in_a_table_wider_than_the_page(browser, tmp_path: Path, deadline) -> None:
    """The compare summary once split ``0.05`` over two lines (``overflow-wrap:anywhere`` in a 14-column table):
    with the reports' own CSS, a table of 24 numeric columns scrolls in its box; no number is broken, nothing
    overflows, the page does not scroll sideways."""
    from sharpness.experiments.report import PAGE_STYLE

    head = "".join(f"<th>test acc % (95% CI) {i}</th>" for i in range(24))
    cells = "".join("<td>0.05</td>" if i % 2 else "<td>94.43±1.23</td>" for i in range(24))
    extra = f"<style>{PAGE_STYLE}</style><table><tr>{head}</tr><tr>{cells}</tr></table>"
    assert check_report(browser, _page(tmp_path / "wide", extra), tmp_path / "wide.png") == []
