"""Open the rendered charts in headless Chromium and check they are drawn (not blank).

Needs Debian's chromium (``sudo apt-get update && sudo apt-get install -y chromium``) and the
``browser`` extra (``pip install -e ".[browser]"``, playwright driving that chromium); left
out of the default run.
Run it with: ``python -m pytest -m browser``.
"""

import shutil
import subprocess

import pytest
from PIL import Image

from analysis.__main__ import main as analysis_main
from etl.extract import main as extract_main
from tests.hostile import LABEL, PWNED, build_hostile_warehouse

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--allow-file-access-from-files", "--virtual-time-budget=15000"]


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: "
                    "sudo apt-get update && sudo apt-get install -y chromium")
    return exe


def screenshot(page, png, tmp_path, size="1400,2400"):
    subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    f"--window-size={size}", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return Image.open(png).convert("RGB")


def drawn_fraction(img):
    """Fraction of pixels that are not (near) white."""
    grey = img.convert("L")
    histogram = grey.histogram()
    return 1 - sum(histogram[245:]) / sum(histogram)


def test_index_and_interactive_chart_render_offline(tiny_checkpoint, tmp_path):
    wh, out = tmp_path / "wh", tmp_path / "charts"
    text = tmp_path / "t.txt"
    text.write_text("The lantern swayed in the wind over the harbour wall. " * 30)
    common = ["--model", str(tiny_checkpoint), "--warehouse", str(wh), "--no-progress"]
    assert extract_main([*common, "--dataset", "ioi", "--n-prompts", "8", "--run-id", "ioi"]) == 0
    assert extract_main([*common, "--dataset", "text", "--data-files", str(text),
                         "--n-batches", "1", "--batch-size", "2", "--seq-len", "32",
                         "--run-id", "text"]) == 0
    assert analysis_main(["--warehouse", str(wh), "--out", str(out), "--no-progress"]) == 0

    index = screenshot(out / "index.html", tmp_path / "index.png", tmp_path)
    assert drawn_fraction(index) > 0.05

    # the interactive HTML draws with the inlined Vega libraries, no network
    chart = screenshot(out / "ioi" / "heatmap.html", tmp_path / "heatmap.png", tmp_path,
                       size="1200,800")
    reds = sum(1 for r, g, b in chart.getdata() if r > 150 and g < 120 and b < 120)
    assert drawn_fraction(chart) > 0.02 and reds > 100  # coloured heatmap cells


def test_explorer_shows_the_clicked_components_tokens(tiny_checkpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    wh, out = tmp_path / "wh", tmp_path / "charts"
    assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(wh),
                         "--no-progress", "--dataset", "ioi", "--n-prompts", "8",
                         "--run-id", "ioi"]) == 0
    assert analysis_main(["--warehouse", str(wh), "--out", str(out), "--no-progress",
                          "--chart", "explorer", "--format", "html"]) == 0
    index = (out / "index.html").read_text()
    assert 'href="ioi/explorer.html"' in index

    def texts(page, title):
        """The text marks of the panel titled ``title`` (a token list or the facts)."""
        return page.evaluate("""title => {
            const heading = [...document.querySelectorAll('g.role-title-text text')]
                .find(t => t.textContent === title);
            const panel = heading.closest('g.role-title').parentElement;
            const marks = panel.querySelectorAll('g.mark-text.role-mark text');
            return [...marks].map(t => t.textContent);
        }""", title)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS[1:])
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.goto((out / "ioi" / "explorer.html").as_uri())
        page.wait_for_selector("g.mark-rect path")
        before = texts(page, "where it raises the entropy most (nats)")
        facts = texts(page, "the clicked component")
        assert before and facts[0].startswith("head ")  # the top head, chosen at start
        cells = page.locator("g.mark-rect.role-mark path")
        chosen = None
        for i in range(cells.count()):
            cells.nth(i).click()
            facts_now = texts(page, "the clicked component")
            if facts_now[0] != facts[0]:
                chosen = facts_now[0]
                break
        assert chosen is not None, "no click changed the facts"
        after = texts(page, "where it raises the entropy most (nats)")
        assert after and after != before  # the table follows the click
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        browser.close()
    assert drawn_fraction(Image.open(tmp_path / "explorer.png").convert("RGB")) > 0.01


def test_hostile_text_runs_no_script_and_is_drawn_as_text(build_warehouse, tmp_path_factory,
                                                          tmp_path):
    """Tokens and a label holding ``</script>``, ``<img onerror>``, ``<svg onload>``,
    ``</style>``, U+2028/U+2029, an override and NUL: no handler runs (each would set the
    title), the explorer draws every cell, and the markup reads as text."""
    from playwright.sync_api import sync_playwright

    from etl.warehouse import Warehouse
    from queries.db import Views

    root = build_hostile_warehouse(build_warehouse, tmp_path_factory)
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--no-progress",
                          "--format", "html", "--run", "hostile", "--chart", "explorer",
                          "--chart", "token_drilldown", "--chart", "heatmap",
                          "--label", f"hostile={LABEL}"]) == 0
    (layers, heads), = Views(Warehouse(root)).con.sql(
        "select n_layers, n_heads from runs where run_id = 'hostile'").fetchall()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS[1:])
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        ran = []
        page.on("dialog", lambda dialog: (ran.append(dialog.message), dialog.dismiss()))
        page.on("pageerror", lambda error: ran.append(str(error)))
        texts = {}
        for chart in ("heatmap", "explorer", "token_drilldown"):
            page.goto((out / "hostile" / f"{chart}.html").as_uri())
            page.wait_for_timeout(500)  # an <img src=x> fails and its onerror runs by now
            assert PWNED not in page.title() and not ran, (chart, page.title(), ran)
            page.wait_for_selector("g.mark-rect path")
            assert page.evaluate("document.querySelectorAll('img, [onerror], [onload]')"
                                 ".length") == 0
            assert page.evaluate("document.scripts.length") == 2  # the library, the spec
            texts[chart] = page.evaluate(
                "[...document.querySelectorAll('svg.marks text')].map(t => t.textContent)")
            assert any(LABEL in text for text in texts[chart])  # the subtitle, as text
        page.goto((out / "hostile" / "explorer.html").as_uri())
        page.wait_for_selector("g.mark-rect path")
        drawn = page.evaluate("""[...document.querySelectorAll('g.mark-rect path')]
            .filter(p => (p.getAttribute('aria-label') || '')
                         .startsWith('head (and MLP) · click a cell')).length""")
        assert drawn == layers * (heads + 1)  # every head and MLP cell
        for chart in ("explorer", "token_drilldown"):  # the contexts and tokens, as text
            assert any("</script>" in t or "<img src=x" in t for t in texts[chart]), chart
        assert any(t.startswith("[") and "<" in t for t in texts["explorer"])  # a [token]

        page.goto((out / "index.html").as_uri())
        page.wait_for_timeout(500)
        assert page.title() == "entropy-warehouse charts" and not ran
        assert page.evaluate("document.querySelector('#runs tbody td').textContent") == LABEL
        browser.close()
