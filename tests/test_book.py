"""The book as a reader sees it: built with -W, served locally, opened in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def toc_files() -> list[str]:
    """Every document in _toc.yml, root first, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    found = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc.get("parts", []))
    return found


def image_outputs(notebook: Path) -> int:
    """Number of figures stored in a notebook's outputs (cells removed from the page excluded)."""
    nb = json.loads(notebook.read_text())
    count = 0
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] != "code" or "remove-output" in tags or "remove-cell" in tags:
            continue
        count += sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))
    return count


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).with_name("jupyter-book")
    proc = subprocess.run([str(jb), "build", str(ROOT), "--path-output", str(out), "--builder", "html",
                           "-W", "-n", "--keep-going"], capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARNING" not in log, f"book build failed or warned:\n{log[-4000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def server(built_book, serve_folder):
    with serve_folder(built_book) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = ("Chromium is not installed, so the book was not checked in a browser; "
                   "install it (Debian/Ubuntu: apt-get install chromium) and rerun make test")
        if os.environ.get("MFUTILS_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """Load a page with every request outside this machine blocked; return (page, outside, js_errors)."""
    page = browser.new_page()
    outside, js_errors = [], []

    def route(r):
        if r.request.url.startswith("http://127.0.0.1"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, f"{url} did not load: {response and response.status}"
    page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
    return page, outside, js_errors


def test_book_builds_with_no_warnings(built_book):
    """Runs without a browser too: the -W build itself is the check (see the built_book fixture)."""
    pages = {p.relative_to(built_book).as_posix() for p in built_book.rglob("*.html")}
    missing = [f"{doc}.html" for doc in toc_files() if f"{doc}.html" not in pages]
    assert not missing, f"pages in _toc.yml that were not built: {missing}"
    assert (built_book / "_static" / "mathjax" / "tex-svg-full.js").is_file(), "MathJax was not copied"


def test_index_redirects_to_the_introduction(browser, server):
    page = browser.new_page()
    page.goto(server + "/index.html")
    page.wait_for_url("**/book/intro.html")
    assert "Matrix factorization in PyTorch" in page.title()


@pytest.mark.parametrize("doc", toc_files())
def test_page_renders_for_a_reader(browser, server, doc):
    page, outside, js_errors = open_page(browser, f"{server}/{doc}.html")
    body = page.inner_text("article")
    assert len(body) > 200, f"{doc}: page body is nearly empty"
    assert "Traceback (most recent call last)" not in body, f"{doc}: a traceback is shown"
    shown_errors = page.locator(".output.traceback, .output.error, .output.stderr, .system-message").count()
    assert shown_errors == 0, f"{doc}: {shown_errors} error or stderr outputs are shown"
    assert not js_errors, f"{doc}: JavaScript errors {js_errors}"
    assert not outside, f"{doc}: requested resources outside the book: {outside[:5]}"

    n_math = page.locator("article .math").count()
    if n_math:
        assert page.evaluate("() => MathJax.version") == "3.2.2"
        typeset = page.locator("article mjx-container").count()
        assert typeset >= n_math, f"{doc}: {n_math} math elements but only {typeset} typeset"

    source = ROOT / f"{doc}.ipynb"
    if source.is_file():
        expected = image_outputs(source)
        assert expected >= 1, f"{doc}: a chapter should show at least one figure"
        images = page.locator("article .cell_output img")
        assert images.count() == expected, f"{doc}: {images.count()} images shown, {expected} stored"
        for k in range(images.count()):
            width = images.nth(k).evaluate("img => img.complete ? img.naturalWidth : 0")
            assert width > 0, f"{doc}: figure {k + 1} did not load"
    page.close()


def test_some_page_typesets_math(browser, server):
    page, _, _ = open_page(browser, f"{server}/book/intro.html")
    assert page.locator("article mjx-container").count() >= 2


def notebook_docs() -> list[str]:
    return [doc for doc in toc_files() if (ROOT / f"{doc}.ipynb").is_file()]


@pytest.mark.parametrize("doc", notebook_docs())
def test_notebook_pages_offer_launch_and_download(browser, server, doc):
    """A reader can open each notebook page in Colab or Binder, on the right file, or download it."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = config["repository"]["url"].removeprefix("https://github.com/")
    branch = config["repository"]["branch"]
    page, _, _ = open_page(browser, f"{server}/{doc}.html")
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))")
    colab = f"https://colab.research.google.com/github/{repo}/blob/{branch}/{doc}.ipynb"
    binder = f"https://mybinder.org/v2/gh/{repo}/{branch}?urlpath=lab/tree/{doc}.ipynb"
    assert colab in hrefs, f"{doc}: no Colab button pointing at {colab}"
    assert binder in hrefs, f"{doc}: no Binder button pointing at {binder}"
    download = [h for h in hrefs if h.endswith(f"_sources/{doc}.ipynb")]
    assert download, f"{doc}: no download button for the .ipynb"
    response = page.request.get(f"{server}/{doc}.html".rsplit("/", 1)[0] + "/" + download[0])
    assert response.ok, f"{doc}: the download button's {download[0]} does not load"
    assert json.loads(response.body()) == json.loads((ROOT / f"{doc}.ipynb").read_text()), (
        f"{doc}: the downloadable notebook differs from notebooks/{Path(doc).name}.ipynb")
    page.close()


def test_every_page_is_reachable_and_no_internal_link_is_broken(browser, server):
    """Follow the links from the first page; every link inside the book must load, and its anchor exist."""
    from urllib.parse import urldefrag, urljoin

    start = f"{server}/{toc_files()[0]}.html"
    seen, queue, broken = {start}, [start], []
    ids: dict[str, set[str]] = {}  # page -> the ids on it
    wanted: dict[str, set[tuple[str, str]]] = {}  # page -> (anchor, linking page)
    page = browser.new_page()
    while queue:
        url = queue.pop()
        response = page.goto(url, wait_until="load")
        if response is None or not response.ok:
            broken.append(f"{url} ({response and response.status})")
            continue
        ids[url] = set(page.eval_on_selector_all("[id]", "nodes => nodes.map(n => n.id)"))
        for href in page.eval_on_selector_all("a[href]", "links => links.map(a => a.getAttribute('href'))"):
            target, fragment = urldefrag(urljoin(url, href))
            if not target.startswith(server) or not target.endswith(".html"):
                continue  # outside the book (GitHub, Colab, Binder), or a file such as the .ipynb download
            if fragment:
                wanted.setdefault(target, set()).add((fragment, url))
            if target not in seen:
                seen.add(target)
                queue.append(target)
    page.close()
    assert not broken, f"internal links that do not load: {broken}"
    missing = [doc for doc in toc_files() if f"{server}/{doc}.html" not in seen]
    assert not missing, f"pages in _toc.yml that no link reaches from {start}: {missing}"
    bad = sorted(f"{target}#{fragment} (linked from {source})" for target, links in wanted.items()
                 for fragment, source in links if target in ids and fragment not in ids[target])
    assert not bad, f"links to anchors that do not exist: {bad[:10]}"
