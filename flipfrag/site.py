"""A static site of the executed notebooks: ``python -m flipfrag.site`` (``make html``) -> ``build/site/index.html``.

Sphinx + myst-nb (``nb_execution_mode = "off"``: nothing is re-run) render the notebooks that ``make figures``
executed (``build/notebooks/``, written by :mod:`flipfrag.runner`) together with ``figures/claims.json`` and
``figures/MANIFEST.json``:

* the home page has the claims table (claim, paper, ours, verdict in colour, notebook) and an index of every figure
  and table id linking to the place on its notebook's page where it is made;
* each notebook gets one page with its narrative, code, outputs and figures, headed by its run (profile, seed,
  runtime, papermill's record of a failure) and the verdicts of the claims it tests.

The Sphinx configuration and stylesheet live in ``docs/site/``; the pages are assembled in a staging folder
(``build/site-src/``) from copies, so the executed notebooks themselves are never modified.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

__all__ = ["SiteError", "figure_anchor", "stage_site", "build_site", "find_chromium", "screenshot", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "docs" / "site"

# one CSS class per verdict of flipfrag.report.VERDICTS (colours in docs/site/_static/flipfrag.css)
VERDICT_CLASS = {
    "reproduced": "verdict-reproduced",
    "partly": "verdict-partly",
    "not reproduced": "verdict-not-reproduced",
    "holds": "verdict-holds",
    "does not hold": "verdict-does-not-hold",
    "measured only": "verdict-measured",
    # rows recorded with the old API (report.LEGACY_VERDICTS)
    "no paper number": "verdict-no-paper",
    "qualitative only": "verdict-qualitative",
}
_SECTIONS = {"00": "Data", "flip_points": "Flip points (Yousefzadeh & O'Leary 2019)",
             "fragility": "Fragility of interpretations (Ghorbani, Abid & Zou 2019)"}  # fmt: skip


_COPIED = ("png", "pdf", "csv")  # figure files copied into the site and linked from the index


def _not_copied(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if "." in n and n.rsplit(".", 1)[-1] not in _COPIED]


class SiteError(RuntimeError):
    """The site cannot be built (no executed notebooks, unreadable inputs, or Sphinx failed)."""


def figure_anchor(item_id: str) -> str:
    """The Sphinx label of the place a figure/table id is made, e.g. ``fragility/fig_x`` -> ``item-fragility-fig-x``."""
    return "item-" + re.sub(r"[^a-z0-9]+", "-", item_id.lower()).strip("-")


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|$#{}])")


def _md(text: Any) -> str:
    """Plain text made safe inside a MyST table cell (Markdown punctuation escaped, one line)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _ref(item_id: str) -> str:
    """A ``{ref}`` role to the anchor of a figure/table id (role text is not Markdown: no escapes, no backticks)."""
    text = item_id.replace("`", "'").replace("<", "(").replace(">", ")")
    return f"{{ref}}`{text} <{figure_anchor(item_id)}>`"


def _verdict(verdict: str) -> str:
    cls = VERDICT_CLASS.get(verdict, "verdict-unknown")
    return f'<span class="verdict {cls}">{_md(verdict)}</span>'


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SiteError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise SiteError(f"{what} {path}: expected a JSON object")
    return data


def _section(name: str) -> str:
    return _SECTIONS.get(name.split("/")[0], _SECTIONS.get(name[:2], "Other"))


def _page_link(notebook: str, pages: set[str], text: str | None = None) -> str:
    label = _md(text or notebook)
    return f"[{label}](<{notebook}.ipynb>)" if notebook in pages else f"{label} (not executed)"


def _item_link(item_id: str, notebook: str, pages: set[str], placed: set[str]) -> str:
    if notebook in pages and item_id in placed:
        return _ref(item_id)
    return _page_link(notebook, pages, item_id)


#: The order of the claims on the home page: paper 1, paper 2, then what neither paper measured.
PAPER_ORDER = ("flip_points", "fragility", "beyond")
#: Each paper's headline on the home page: (claim id, figure id); the sentence is generated from the claim's row.
HEADLINES = {
    "flip_points": ("flip_points/claim2_confidence", "flip_points/fig_confidence"),
    "fragility": ("fragility/claim2_topk_eps8", "fragility/fig_imagenet_grid"),
}
_PAPER_TITLES = {"flip_points": "Paper 1 — Interpreting neural networks using flip points",
                 "fragility": "Paper 2 — Interpretation of neural networks is fragile"}  # fmt: skip
_HEADLINE_CHARS = 90


def _claim_order(cid: str) -> tuple[int, str]:
    paper = cid.split("/")[0]
    return (PAPER_ORDER.index(paper) if paper in PAPER_ORDER else len(PAPER_ORDER), cid)


def _headline(c: dict[str, Any]) -> str:
    """The *ours* cell: a numeric row's numbers as they are; a long text its first clause, cut to a line."""
    ours = str(c.get("ours", ""))
    if c.get("kind") == "numeric" or len(ours) <= _HEADLINE_CHARS:
        return ours
    first = re.split(r"; | \| | — ", ours, maxsplit=1)[0]
    return first if len(first) <= _HEADLINE_CHARS else first[: _HEADLINE_CHARS - 1].rstrip() + "…"


def _headlines(entries: dict[str, Any], manifest: dict[str, Any], names: set[str],
               figures_rel: str | None) -> list[str]:  # fmt: skip
    """Per paper: its headline figure and one sentence generated from its headline claim's row."""
    lines: list[str] = []
    for paper, (cid, fig) in HEADLINES.items():
        c = entries.get(cid)
        if c is None:
            continue
        lines += [f"## {_PAPER_TITLES[paper]}", ""]
        sentence = (f"{c.get('claim', '')}: the paper {c.get('paper', '')}; ours {_headline(c)} — "
                    f"**{c.get('verdict', '')}** (see {c.get('notebook', '')}).")  # fmt: skip
        lines += [_md(sentence).replace("\\*\\*", "**"), ""]
        files = manifest.get("entries", {}).get(fig, {}).get("files", [])
        png = next((f for f in files if f.endswith(".png")), None)
        if figures_rel and png:
            lines += [f'<img src="{figures_rel}/{html.escape(png)}" alt="{html.escape(fig)}" width="720">', ""]
    return lines


def _index_page(claims: dict[str, Any], manifest: dict[str, Any], pages: dict[str, dict[str, Any]],
                placed: set[str], figures_rel: str | None) -> str:  # fmt: skip
    names = set(pages)
    lines = ["# flipfrag: the executed notebooks", ""]
    profiles = sorted({info["profile"] for info in pages.values() if info.get("profile")})
    lines += [
        "Closest flip points (Yousefzadeh & O'Leary 2019) and the fragility of interpretations (Ghorbani, Abid & "
        "Zou 2019), reproduced by parameterized notebooks. Every page below is a notebook as `make figures` executed "
        f"it (profile {', '.join(profiles) or 'unknown'}); nothing was re-run to build this site.",
        "",
    ]
    entries = claims.get("claims", {})
    recorded = sorted(
        {c.get("profile") for c in entries.values() if c.get("profile")}
        | {e.get("profile") for e in manifest.get("entries", {}).values() if e.get("profile")}
    )
    if recorded and profiles and recorded != profiles:
        lines += [":::{warning}", f"The claims and figures below were recorded by profile {', '.join(recorded)}, "
                  f"but the notebook pages come from profile {', '.join(profiles)}: their numbers differ. Run "
                  "`make figures` and then `make html` to get both from one run.", ":::", ""]  # fmt: skip
    lines += _headlines(entries, manifest, names, figures_rel)
    lines += ["## Claims", ""]
    if entries:
        counts: dict[str, int] = {}
        for c in entries.values():
            counts[c.get("verdict", "?")] = counts.get(c.get("verdict", "?"), 0) + 1
        lines += [" ".join(f"{_verdict(v)} {n}" for v, n in counts.items()), ""]
        lines += ["Paper 1 (flip points), paper 2 (fragility), then beyond both papers; each *ours* cell is the "
                  "headline number; the notebook's page has the detail.", ""]  # fmt: skip
        lines += ["| claim | paper | ours | verdict | notebook |", "|---|---|---|---|---|"]
        for cid, c in sorted(entries.items(), key=lambda kv: _claim_order(kv[0])):
            lines.append(
                f"| **{_md(cid)}** {_md(c.get('claim', ''))} | {_md(c.get('paper', ''))} | {_md(_headline(c))} "
                f"| {_verdict(c.get('verdict', ''))} | {_page_link(c.get('notebook', ''), names)} |"
            )
    else:
        lines.append("No claims recorded (figures/claims.json is missing or empty).")
    lines += ["", "## Figures and tables", ""]
    items = manifest.get("entries", {})
    if items:
        lines += ["| id | notebook | files | profile |", "|---|---|---|---|"]
        for item_id, e in sorted(items.items()):
            nb = e.get("notebook", "")
            if figures_rel:  # the copied files as links (the .md twins of the tables are on the pages already)
                files = ", ".join(
                    f'<a href="{figures_rel}/{html.escape(f)}">{html.escape(f.rsplit(".", 1)[-1])}</a>'
                    for f in e.get("files", [])
                    if f.rsplit(".", 1)[-1] in _COPIED
                )
            else:
                files = ", ".join(_md(f) for f in e.get("files", []))
            lines.append(f"| {_item_link(item_id, nb, names, placed)} | {_page_link(nb, names)} | {files} "
                         f"| {_md(e.get('profile', ''))} |")  # fmt: skip
    else:
        lines.append("No figures recorded (figures/MANIFEST.json is missing or empty).")
    lines += [""]
    groups: dict[str, list[str]] = {}
    for name in sorted(pages):
        groups.setdefault(_section(name), []).append(name)
    for caption, members in groups.items():
        lines += ["```{toctree}", ":hidden:", f":caption: {caption}", "", *members, "```", ""]
    return "\n".join(lines)


def _run_cell(name: str, nb: nbformat.NotebookNode, claims: dict[str, Any], manifest: dict[str, Any],
              placed: list[str]) -> nbformat.NotebookNode:  # fmt: skip
    pm = nb.metadata.get("papermill", {})
    params = pm.get("parameters", {})
    run = manifest.get("notebooks", {}).get(name, {})
    facts = [f"profile `{params.get('profile', run.get('profile', '?'))}`", f"seed `{params.get('seed', '?')}`"]
    if pm.get("duration") is not None:
        facts.append(f"executed in {float(pm['duration']):.1f} s")
    if pm.get("end_time"):
        facts.append(f"finished {pm['end_time'][:19].replace('T', ' ')} UTC")
    lines = [":::{admonition} This run", ":class: note", "", "; ".join(facts) + "."]
    if pm.get("exception"):
        lines += ["", '<span class="verdict verdict-not-reproduced">failed</span> this notebook raised an exception '
                  "when it was executed; the traceback is in the failing cell's output below."]  # fmt: skip
    own = [(cid, c) for cid, c in claims.get("claims", {}).items() if c.get("notebook") == name]
    if own:
        lines += ["", "| claim | ours | verdict |", "|---|---|---|"]
        lines += [f"| **{_md(cid)}** {_md(c.get('claim', ''))} | {_md(c.get('ours', ''))} "
                  f"| {_verdict(c.get('verdict', ''))} |" for cid, c in own]  # fmt: skip
    if placed:
        lines += ["", "Made here: " + ", ".join(_ref(i) for i in placed) + "."]
    lines += [":::"]
    return nbformat.v4.new_markdown_cell("\n".join(lines))


def _stage_notebook(name: str, src: Path, dest: Path, claims: dict[str, Any], manifest: dict[str, Any],
                    figures_dir: Path, figures_ok: bool) -> dict:  # fmt: skip
    try:
        nb = nbformat.read(src, as_version=4)
    except Exception as err:  # nbformat raises several types for unreadable files
        raise SiteError(f"executed notebook {src} could not be read: {err}") from err
    items = sorted(i for i, e in manifest.get("entries", {}).items() if e.get("notebook") == name)
    cells: list[nbformat.NotebookNode] = []
    placed: list[str] = []
    entries = manifest.get("entries", {})
    for cell in nb.cells:
        made = []
        if cell.cell_type == "code":
            made = [i for i in items if i not in placed and (f'"{i}"' in cell.source or f"'{i}'" in cell.source)]
            for item_id in made:
                cells.append(nbformat.v4.new_markdown_cell(f"({figure_anchor(item_id)})=\n**{_md(item_id)}**"))
                placed.append(item_id)
        cells.append(cell)
        # save_figure closes the figure, so the executed cell shows no image: show the saved PNG after the cell
        for item_id in made:
            pngs = [f for f in entries[item_id].get("files", []) if f.endswith(".png") and (figures_dir / f).exists()]
            if pngs and figures_ok:
                cells.append(nbformat.v4.new_markdown_cell("\n\n".join(
                    f"![{_md(item_id)}](/_extra/figures/{f})" for f in pngs)))  # fmt: skip
    # the run box goes after the title cell (the page title is the notebook's first heading)
    at = 1 if cells and cells[0].cell_type == "markdown" and cells[0].source.lstrip().startswith("#") else 0
    cells.insert(at, _run_cell(name, nb, claims, manifest, placed))
    nb.cells = cells
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    params = nb.metadata.get("papermill", {}).get("parameters", {})
    return {"profile": params.get("profile"), "placed": placed, "failed": bool(nb.metadata.get("papermill", {})
            .get("exception"))}  # fmt: skip


def stage_site(notebooks_dir: str | Path, figures_dir: str | Path, stage_dir: str | Path) -> dict[str, Any]:
    """Assemble the Sphinx source folder: config, stylesheet, the home page and copies of the executed notebooks.

    Returns ``{"pages": {notebook name: info}, "placed": [figure ids with an anchor]}``. Raises :class:`SiteError`
    if ``notebooks_dir`` holds no executed notebook.
    """
    notebooks_dir, figures_dir, stage = Path(notebooks_dir), Path(figures_dir), Path(stage_dir)
    found = sorted(p for p in notebooks_dir.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts) \
        if notebooks_dir.is_dir() else []  # fmt: skip
    if not found:
        raise SiteError(f"notebooks_dir {notebooks_dir} has no executed notebooks; run `make figures` first "
                        "(the runner writes them to build/notebooks/)")  # fmt: skip
    claims = _read_json(figures_dir / "claims.json", "claims file")
    manifest = _read_json(figures_dir / "MANIFEST.json", "manifest")
    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(CONFIG_DIR, stage, ignore=shutil.ignore_patterns("__pycache__"))
    figures_rel = None
    if figures_dir.is_dir():  # the figure files themselves, linked from the index (html_extra_path copies them)
        shutil.copytree(figures_dir, stage / "_extra" / "figures", ignore=_not_copied)
        figures_rel = "figures"
    pages: dict[str, dict[str, Any]] = {}
    for src in found:
        name = src.relative_to(notebooks_dir).with_suffix("").as_posix()
        pages[name] = _stage_notebook(name, src, stage / f"{name}.ipynb", claims, manifest, figures_dir,
                                      figures_rel is not None)  # fmt: skip
    placed = {i for info in pages.values() for i in info["placed"]}
    (stage / "index.md").write_text(_index_page(claims, manifest, pages, placed, figures_rel))
    return {"pages": pages, "placed": sorted(placed)}


def build_site(notebooks_dir: str | Path = REPO_ROOT / "build" / "notebooks",
               figures_dir: str | Path = REPO_ROOT / "figures", out_dir: str | Path = REPO_ROOT / "build" / "site",
               *, stage_dir: str | Path | None = None, quiet: bool = True) -> Path:  # fmt: skip
    """Stage and build the site with Sphinx (myst-nb, no execution); returns the path of ``index.html``."""
    out_dir = Path(out_dir)
    stage = Path(stage_dir) if stage_dir is not None else out_dir.parent / f"{out_dir.name}-src"
    stage_site(notebooks_dir, figures_dir, stage)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    # Sphinx writes into <stage>/_build/html (myst-nb puts its jupyter_execute/ scratch folder next to the output,
    # so it stays in the staging folder); the finished site is then moved to out_dir
    built = stage / "_build" / "html"
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-d", str(stage / ".doctrees"), str(stage), str(built)]
    if quiet:
        cmd.insert(3, "-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SiteError(f"sphinx-build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(out_dir))
    index = out_dir / "index.html"
    if not index.exists():
        raise SiteError(f"sphinx-build wrote no {index}")
    return index


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary (Debian's ``chromium`` first), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def screenshot(page: str | Path, png: str | Path, *, width: int = 1400, height: int = 1800,
               timeout: float = 120.0) -> Path:  # fmt: skip
    """Render ``page`` (an HTML file) in headless Chromium and save a ``width`` x ``height`` PNG; returns its path.

    Raises :class:`SiteError` if no Chromium is installed (Debian: ``apt-get install chromium``) or it wrote no image.
    """
    import tempfile

    browser = find_chromium()
    if browser is None:
        raise SiteError("no chromium found on PATH (Debian/Ubuntu: apt-get install -y chromium)")
    page, png = Path(page).resolve(), Path(png).resolve()
    if not page.exists():
        raise SiteError(f"page {page} does not exist")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="flipfrag-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png}", page.as_uri()]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.exists() or png.stat().st_size == 0:
        raise SiteError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks-dir", default=str(REPO_ROOT / "build" / "notebooks"))
    parser.add_argument("--figures-dir", default=str(REPO_ROOT / "figures"))
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "build" / "site"))
    parser.add_argument("--screenshot", nargs="*", metavar="PAGE", default=None,
                        help="after building (or with --no-build), save headless-Chromium PNGs of these pages of the "
                        "site (default: index.html) next to the site as <out-dir>-shots/<page>.png")  # fmt: skip
    parser.add_argument("--no-build", action="store_true", help="only take the screenshots of an existing site")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if not args.no_build:
            index = build_site(args.notebooks_dir, args.figures_dir, args.out_dir)
            print(f"site built in {time.perf_counter() - start:.1f} s: {index}")
        if args.screenshot is not None:
            out = Path(args.out_dir)
            for page in args.screenshot or ["index.html"]:
                shot = screenshot(out / page, out.parent / f"{out.name}-shots" / (page.replace("/", "_") + ".png"))
                print(f"screenshot: {shot}")
    except SiteError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
