"""`make html`: the site of executed notebooks, built from a tiny executed-notebook fixture (no kernel is started).

The fixture's stored outputs differ from what its code would print, and its code would write a marker file if it
ran: the site must show the stored outputs and never execute anything.
"""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import nbformat
import numpy as np
import pytest

from flipfrag import site
from flipfrag.report import VERDICTS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STORED = "stored-output-7319"


def _executed_notebook(path: Path, marker: Path, profile: str = "smoke") -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["papermill"] = {"parameters": {"profile": profile, "seed": 3}, "duration": 12.5,
                                "end_time": "2026-11-30T10:00:00.000000", "exception": None}  # fmt: skip
    title = nbformat.v4.new_markdown_cell("# Demo notebook\n\nSome narrative with *emphasis*.")
    params = nbformat.v4.new_code_cell('profile = "quick"\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    run = nbformat.v4.new_code_cell(f"open({str(marker)!r}, 'w').write('ran')\nprint('what the code would print')")
    run.outputs = [nbformat.v4.new_output("stream", name="stdout", text=STORED + "\n")]
    run.execution_count = 1
    fig = nbformat.v4.new_code_cell('plotting.save_figure(fig, "demo/fig_demo")')
    fig.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "{'id': 'demo/fig_demo'}"},
                                          execution_count=2)]  # fmt: skip
    fig.execution_count = 2
    nb.cells = [title, params, run, fig]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _figures(folder: Path, profile: str = "smoke") -> None:
    (folder / "demo").mkdir(parents=True)
    f, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    f.savefig(folder / "demo" / "fig_demo.png")
    plt.close(f)
    entry = {"files": ["demo/fig_demo.png", "demo/fig_demo.pdf"], "notebook": "demo/01_demo", "profile": profile}
    other = {"files": ["other/table_x.csv"], "notebook": "other/02_missing", "profile": profile}
    manifest = {"entries": {"demo/fig_demo": {"id": "demo/fig_demo", **entry}, "other/table_x": other},
                "notebooks": {"demo/01_demo": {"profile": profile, "seed": 3, "runtime_s": 12.5}}}  # fmt: skip
    claims = {"claims": {}, "substitutions": {}}
    for i, verdict in enumerate(VERDICTS):
        claims["claims"][f"demo/claim{i}"] = {
            "id": f"demo/claim{i}", "claim": f"claim number {i} | with a pipe and *stars*", "paper": "0.5",
            "ours": f"ours-{i}", "verdict": verdict, "notebook": "demo/01_demo", "profile": profile,
        }  # fmt: skip
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    (folder / "claims.json").write_text(json.dumps(claims))


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.imgs: list[str] = []
        self.spans: list[tuple[str, str]] = []  # (class, text) of verdict spans
        self._span: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "span" and "verdict" in (a.get("class") or "").split():
            self._span = a["class"]

    def handle_data(self, data):
        if self._span is not None:
            self.spans.append((self._span, data.strip()))
            self._span = None


def _parse(path: Path) -> _Collector:
    c = _Collector()
    c.feed(path.read_text())
    return c


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    marker = tmp / "executed.marker"
    _executed_notebook(tmp / "nb" / "demo" / "01_demo.ipynb", marker)
    _figures(tmp / "figs")
    index = site.build_site(tmp / "nb", tmp / "figs", tmp / "out")
    return tmp, index, marker


def test_home_page_has_every_claim_with_its_verdict_colour(built):
    tmp, index, _ = built
    assert index == tmp / "out" / "index.html"
    page = _parse(index)
    text = index.read_text()
    table_spans = [(cls, t) for cls, t in page.spans if t in VERDICTS]
    for verdict in VERDICTS:  # one legend chip and one table chip per verdict, each with the verdict's own class
        hits = [cls for cls, t in table_spans if t == verdict]
        assert len(hits) == 2 and all(site.VERDICT_CLASS[verdict] in cls for cls in hits), (verdict, hits)
    assert "claim number 0 | with a pipe and *stars*" in text.replace("&amp;", "&")  # escaped, not a table split
    css = (tmp / "out" / "_static" / "flipfrag.css").read_text()
    colours = {re.search(rf"\.{site.VERDICT_CLASS[v]} {{ background: (#[0-9a-f]{{6}})", css).group(1) for v in VERDICTS}
    assert len(colours) == len(VERDICTS)  # five different colours
    assert "demo/01_demo.html" in page.links


def test_each_figure_id_links_to_the_cell_that_makes_it(built):
    tmp, index, _ = built
    anchor = site.figure_anchor("demo/fig_demo")
    assert f"demo/01_demo.html#{anchor}" in _parse(index).links
    nb_page = _parse(tmp / "out" / "demo" / "01_demo.html")
    assert anchor in nb_page.ids
    # an id whose notebook was not executed is listed without a dangling link
    assert "other/table_x" in index.read_text() and not any("02_missing" in h for h in _parse(index).links)
    # the index links the figure files copied into the site
    assert "figures/demo/fig_demo.png" in _parse(index).links and (tmp / "out" / "figures/demo/fig_demo.png").exists()


def test_notebook_page_shows_stored_outputs_figure_and_run_without_executing(built):
    tmp, _, marker = built
    html = (tmp / "out" / "demo" / "01_demo.html").read_text()
    assert STORED in html and "what the code would print" in html  # stored output + source, not a new output
    assert html.count("what the code would print") == 1
    assert not marker.exists()
    page = _parse(tmp / "out" / "demo" / "01_demo.html")
    assert [src for src in page.imgs if "fig_demo" in src], page.imgs
    img = next(src for src in page.imgs if "fig_demo" in src)
    assert (tmp / "out" / "demo" / img).resolve().exists()
    assert "Demo notebook" in html and "12.5 s" in html and "smoke" in html  # title and the run box
    assert {t for _, t in page.spans} >= set(VERDICTS)  # the notebook's own claims with their verdicts


def test_profile_mismatch_is_announced(tmp_path):
    _executed_notebook(tmp_path / "nb" / "demo" / "01_demo.ipynb", tmp_path / "m", profile="smoke")
    _figures(tmp_path / "figs", profile="quick")
    site.stage_site(tmp_path / "nb", tmp_path / "figs", tmp_path / "stage")
    text = (tmp_path / "stage" / "index.md").read_text()
    assert "recorded by profile quick" in text and "come from profile smoke" in text


def test_no_executed_notebooks_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(site.SiteError, match="notebooks_dir .*make figures"):
        site.build_site(tmp_path / "empty", tmp_path, tmp_path / "out")


def test_screenshot_in_headless_chromium(built):
    """A real browser renders the home page: the verdict colours appear in the pixels."""
    if site.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the HTML tests above still ran")
    from PIL import Image

    tmp, index, _ = built
    png = site.screenshot(index, tmp / "shot.png", width=1200, height=1400)
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    assert img.std() > 10  # not a blank page
    css = (tmp / "out" / "_static" / "flipfrag.css").read_text()
    for verdict in ("reproduced", "not reproduced"):
        hexcol = re.search(rf"\.{site.VERDICT_CLASS[verdict]} {{ background: #([0-9a-f]{{6}})", css).group(1)
        rgb = np.array([int(hexcol[i : i + 2], 16) for i in (0, 2, 4)])
        assert (np.abs(img - rgb).max(1) <= 3).sum() > 50, verdict  # a badge's worth of pixels in that colour


def test_home_page_leads_with_each_papers_headline_and_orders_claims_by_paper():
    """Issue 22: the home page opens with paper 1's and paper 2's headline (a sentence generated from the claim's
    row, and its figure), lists the claims paper 1, paper 2, beyond (not alphabetically, where beyond came first),
    and keeps each long *ours* cell to its first clause (the detail is on the notebook's page)."""
    long = "mnist-erf (n = 40): SG -0.25 [-0.56, +0.11] (none found); DeepLIFT -0.03 [-0.35, +0.31] " * 3
    claims = {"claims": {
        "beyond/boundary_fragility_corr": {"claim": "beyond claim", "paper": "not available offline", "ours": long,
                                           "kind": "measured", "verdict": "measured only", "notebook": "beyond/01"},
        "fragility/claim2_topk_eps8": {"claim": "Top-k attack, ε = 8: top-k intersection", "paper": "SG 0.005",
                                       "ours": "SG 0.21 / DL 0.22 / IG 0.15", "kind": "numeric", "verdict": "partly",
                                       "notebook": "fragility/03"},
        "flip_points/claim2_confidence": {"claim": "Distance measures confidence", "paper": "much better",
                                          "ours": "AUROC 0.818 vs 0.816", "kind": "qualitative",
                                          "verdict": "does not hold", "notebook": "flip_points/02"},
    }}  # fmt: skip
    manifest = {"entries": {"fragility/fig_imagenet_grid": {"files": ["fragility/fig_imagenet_grid.png"],
                                                            "notebook": "fragility/03", "profile": "quick"}}}
    pages = {"fragility/03": {"profile": "quick"}, "flip_points/02": {"profile": "quick"},
             "beyond/01": {"profile": "quick"}}  # fmt: skip
    text = site._index_page(claims, manifest, pages, set(), "figures")
    assert text.index("Paper 1") < text.index("Paper 2") < text.index("## Claims")
    assert "Top-k attack, ε = 8: top-k intersection: the paper SG 0.005; ours SG 0.21 / DL 0.22 / IG 0.15" in text
    assert '<img src="figures/fragility/fig_imagenet_grid.png"' in text
    table = text[text.index("| claim | paper |"):]
    order = [table.index(f"**{cid.replace('_', chr(92) + '_')}**") for cid in (
        "flip_points/claim2_confidence", "fragility/claim2_topk_eps8", "beyond/boundary_fragility_corr")]
    assert order == sorted(order)
    assert "DeepLIFT" not in table and "mnist-erf (n = 40): SG -0.25" in table  # first clause only
