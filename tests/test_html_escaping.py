"""Every value written into a page (tokens and their contexts, run labels, titles, run
fields, the warehouse's path) is escaped for where it lands: a chart page holds it only as
script-safe JSON (no raw ``</script``, ``<img``, ``<svg``), the index only as escaped HTML
text. Checked on the written files, without a browser; ``test_browser`` opens them."""

import json
import shutil
from html.parser import HTMLParser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.__main__ import main as analysis_main
from analysis.catalog import ALL_CHARTS
from analysis.escaping import script_json, script_safe, url_path
from etl.warehouse import Warehouse
from queries.db import Views
from tests.hostile import HOSTILE, LABEL, MARKUP, TITLE, build_hostile_warehouse

SPEC_START, SPEC_END = "const spec = ", ";\n  const embedOpt"


class Page(HTMLParser):
    """The elements, attributes, script bodies and text of an HTML page as a browser's
    tokenizer reads them (a script's body ends at the first ``</script``)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        self.inside = tag
        if tag == "script":
            self.scripts.append("")

    def handle_endtag(self, tag):
        self.inside = None

    def handle_data(self, data):
        if getattr(self, "inside", None) == "script":
            self.scripts[-1] += data
        elif getattr(self, "inside", None) != "style":
            self.text.append(data)


@pytest.fixture(scope="module")
def pages(build_warehouse, tmp_path_factory):
    """Every chart of the hostile warehouse as HTML, and the index, written by ``python -m
    analysis`` from a warehouse folder whose name is markup too, with hostile labels; the
    heatmap again with a hostile title. Returns (the warehouse's path, the output folder)."""
    built = build_hostile_warehouse(build_warehouse, tmp_path_factory)
    root = tmp_path_factory.mktemp("named") / "wh \"'><img src=x onerror=alert(1)>"
    shutil.copytree(built, root)
    out = tmp_path_factory.mktemp("hostile-charts")
    labels = ["--label", f"hostile={LABEL}", "--label", f"plain={HOSTILE[2]}"]
    assert analysis_main(["--warehouse", str(root), "--out", str(out / "all"), "--format",
                          "html", "--no-progress", *labels]) == 0
    assert analysis_main(["--warehouse", str(root), "--out", str(out / "titled"), "--format",
                          "html", "--no-progress", "--chart", "heatmap", "--title", TITLE,
                          *labels]) == 0
    return root, out


def test_the_corpus_holds_every_hostile_string(pages):
    root, _ = pages
    con = Views(Warehouse(root)).con
    text = "".join(t for (t,) in con.sql("select token from tokens where run_id = 'hostile' "
                                         "and not is_bos order by seq, position").fetchall())
    assert all(h in text for h in HOSTILE if h.isascii())


def _spec(page_text: str) -> tuple[str, dict]:
    """The spec's JSON text in a chart page's last script, and its value."""
    page = Page(page_text)
    assert [t for t in page.tags if t == "script"] == ["script", "script"]  # library, spec
    assert set(page.tags) <= {"html", "head", "meta", "style", "script", "body", "div"}
    assert not [name for name, _ in page.attrs if name.startswith("on")]
    body = page.scripts[-1]
    raw = body[body.index(SPEC_START) + len(SPEC_START):body.index(SPEC_END)]
    return raw, json.loads(raw)


def _strings(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _strings(item)


def _token_rows(value):
    """Every data row (a JSON object) of a spec with a token and its context."""
    if isinstance(value, dict):
        if isinstance(value.get("token"), str) and isinstance(value.get("context"), str):
            yield value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _token_rows(item)


def _chart_pages(out):
    pages = sorted((out / "all").glob("*/*.html"))
    drawn = {p.stem for p in pages}
    assert drawn == set(ALL_CHARTS), drawn  # every kind of chart page is checked
    return pages + sorted((out / "titled").glob("*/*.html"))


def test_chart_pages_hold_data_and_labels_only_as_script_safe_json(pages):
    _, out = pages
    for path in _chart_pages(out):
        raw, spec = _spec(path.read_text(encoding="utf-8"))
        assert not any(c in raw for c in "<>&\u2028\u2029"), path
        strings = list(_strings(spec))
        assert any(LABEL in s or HOSTILE[2] in s for s in strings), path  # a run's label
        if path.parent.parent.name == "titled":
            assert spec["title"]["text"] == TITLE


@pytest.mark.parametrize("chart", ["explorer", "token_drilldown"])
def test_token_pages_hold_the_hostile_tokens_as_data(pages, chart):
    _, out = pages
    raw, spec = _spec((out / "all" / "hostile" / f"{chart}.html").read_text(encoding="utf-8"))
    rows = list(_token_rows(spec))
    assert any("<" in row["token"] for row in rows)
    assert any("</script>" in row["context"] or "<img src=x" in row["context"] for row in rows)
    for markup in MARKUP:
        assert markup not in raw


def test_the_index_holds_labels_and_paths_as_text(pages):
    root, out = pages
    for index in (out / "all" / "index.html", out / "titled" / "index.html"):
        text = index.read_text(encoding="utf-8")
        page = Page(text)
        assert {"script", "svg", "img", "style"} & set(page.tags) == {"style"}
        assert not [name for name, _ in page.attrs if name.startswith("on")]
        shown = "".join(page.text)
        assert LABEL in shown and HOSTILE[2] in shown and str(root) in shown
        for markup in MARKUP:
            assert markup not in text.split("</style>", 1)[1]


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=20))
def test_script_json_is_the_same_value_without_markup_characters(value):
    text = script_json(value)
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert json.loads(text) == value


def test_script_safe_keeps_non_ascii_json_the_same_value():
    value = {"k<": "a\u2028b\u2029</script>&amp;\u202e\x00é"}
    text = script_safe(json.dumps(value, ensure_ascii=False))
    assert not any(c in text for c in "<>&\u2028\u2029") and json.loads(text) == value


def test_url_paths_cannot_start_a_scheme_or_a_fragment():
    assert url_path("javascript:alert(1)/heatmap") == "javascript%3Aalert%281%29/heatmap"
    assert url_path("a#b?c/heatmap") == "a%23b%3Fc/heatmap"
