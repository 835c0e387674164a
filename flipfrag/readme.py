"""README.md's measured numbers, generated from the files that hold them (never typed in).

Each generated block sits between ``<!-- name:begin -->`` and ``<!-- name:end -->``; ``python -m flipfrag.report
--readme`` (run by ``make figures``, ``make bench`` and ``make test``) rewrites them all, and ``tests/test_readme.py``
fails when the committed README differs from what this module writes from the committed files:

* ``claims`` — the scoreboard of ``figures/claims.json`` (:mod:`flipfrag.report`);
* ``runtimes`` — notebook runtimes and the provenance of the figures, from ``figures/MANIFEST.json``;
* ``tests`` — the last recorded test run, ``benchmarks/results/test_run.json`` (written by ``tests/conftest.py``
  when ``FLIPFRAG_TEST_SUMMARY`` names it, as ``make test`` does);
* ``speed`` — the speed table, from ``benchmarks/results/*.json``;
* ``cost`` — the projected cost of the paper profile, ``benchmarks/results/paper_cost.json``;
* ``beyond`` — the beyond-both-papers findings, read off ``figures/beyond/table_boundary_vs_fragility.csv``.

:func:`prose_number_problems` is the check that README prose (outside generated blocks, code, tables of settings and
the allowed names) carries words, not measured figures.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TEST_RUN = RESULTS / "test_run.json"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _x(v: float) -> str:
    """A speed ratio: 1.5x, 14.8x, 3,671x."""
    if not math.isfinite(v):
        return "n/a"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.1f}x" if v >= 0.95 else f"{v:.2g}x"


def _ms(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v / 1000:.1f} s" if v >= 1000 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


# ------------------------------------------------------------------------------------------------- tests


def render_tests(path: Path = TEST_RUN) -> str:
    """One sentence on the last recorded test run (what ran, how many passed, how long, at which commit)."""
    run = _load(path)
    if run is None:
        return (f"No test run recorded yet (`{path.relative_to(ROOT).as_posix()}` is written by `make test`).")
    counts = ", ".join(f"{run['outcomes'][k]} {k}" for k in ("passed", "failed", "skipped", "error", "xfailed")
                       if run["outcomes"].get(k))  # fmt: skip
    sel = f" (selection: `{run['selection']}`)" if run.get("selection") else ""
    dirty = ", uncommitted changes" if run.get("dirty") else ""
    return (f"Last recorded test run (`{path.relative_to(ROOT).as_posix()}`): {run['collected']} tests collected"
            f"{sel}, {counts}, in {run['duration_s']:.0f} s on {run['machine']} ({run['threads']} torch threads), "
            f"code `{run['commit'][:7]}`{dirty}, {run['date']}.")  # fmt: skip


# ------------------------------------------------------------------------------------------------- speed


def _flip_rows() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(source file, run, model row) per model: ``flip.json`` unless a later ``flip_*.json`` re-measured it — but a
    row measured against every peer (FMN / DDN too: it has ``goals``) is not replaced by one without them."""
    rows: dict[str, tuple[str, dict, dict]] = {}
    for name in ["flip.json", *sorted(p.name for p in RESULTS.glob("flip_*.json"))]:
        run = _load(RESULTS / name)
        if run is None:
            continue
        for m in run["models"]:
            old = rows.get(m["model"])
            if old is None or "goals" in m or "goals" not in old[2]:
                rows[m["model"]] = (name, run, m)  # a later file replaces the row of the same model
    return list(rows.values())


def _peer(m: dict[str, Any], peer: str) -> str:
    p = m[peer]
    c = p["ratio_to_crossing"]
    if not c.get("compared"):
        return f"{peer} {_ms(p['ms'])}"
    d = p["ratio_to_distance"]
    changed = round(p["label_changed"] * m["points"]) if p.get("label_changed") is not None else c["compared"]
    where = ("compared there" if changed == c["compared"]
             else f"compared on {c['compared']} of them (flipfrag's point certified, the crossing found)")  # fmt: skip
    return (f"{peer} {_ms(p['ms'])} (flipfrag {_x(m[f'speedup_vs_{peer}'])} as fast; {peer} changed the label on "
            f"{changed} of {m['points']}, {where}: our distance / {peer}'s distance median "
            f"{d['median']:.3f}, / the crossing toward {peer}'s point median {c['median']:.3f}, max {c['max']:.3f}, "
            f"{c['farther_1pct']} farther than 1 %)")  # fmt: skip


def _flip_row(source: str, run: dict[str, Any], m: dict[str, Any]) -> str:
    threads = run["machine"].rsplit(",", 1)[-1].strip().replace("1 threads", "1 thread")
    targets = ("the runner-up class" if m.get("target") == "runner-up" else "the other class" if m["classes"] == 2
               else f"all {m['classes'] - 1} other classes")  # fmt: skip
    what = (f"closest flip points toward {targets}, {m['model']} ({m['points']} points, {threads}, median of "
            f"{m.get('repeats', run.get('repeats'))} runs; `{source}`)")  # fmt: skip
    sl = m["SLSQP"]
    slsqp = (f"SciPy SLSQP {_ms(sl['ms'])} ({_x(m['speedup_vs_SLSQP'])}; {sl['basis']})" if math.isfinite(sl["ms"])
             else f"SciPy SLSQP {sl['basis']}")  # fmt: skip
    peak = m.get("ours_peak_rss_gb")
    result = "; ".join([f"flipfrag {_ms(m['ours_ms'])} per point, {100 * m['certified']:.1f} % certified"
                        + ("" if peak is None else f", peak memory {peak:.1f} GB"),
                        *(_peer(m, p) for p in ("FAB", "DeepFool") if p in m), slsqp])  # fmt: skip
    g = m.get("goals")  # runs with the minimum-norm peers FMN / DDN (issue 25): goals over every peer
    if g:
        fastest = g.get("fastest_qualifying_peer")
        passes = f"{m['ours_passes_fwd']:.0f} / {m['ours_passes_bwd']:.0f} forward / backward passes per point"
        if fastest:
            pf = m[fastest]
            result += (f"; fastest peer within 1 % of flipfrag's distance: {fastest} {_ms(pf['ms'])} "
                       f"({pf['passes_fwd']:.0f} / {pf['passes_bwd']:.0f} passes; flipfrag "
                       f"{_x(g['speedup_vs_fastest_qualifying'])} as fast, {passes})")  # fmt: skip
        else:
            result += f"; no peer within 1 % of flipfrag's distance ({passes})"
        speed = (f"≥ 2x the fastest qualifying peer: {_met(bool(g['speed_2x']))}" if fastest
                 else "≥ 2x the fastest qualifying peer: no peer qualifies")  # fmt: skip
        goals = [speed, f"≥ 99 % certified: {_met(m['certified'] >= 0.99)}",
                 f"none farther than 1.01 x any peer's crossing: {_met(bool(g['never_farther']))}"
                 + ("" if g["never_farther"] else f" ({g['farther_than_1pct_of_a_crossing']} points)")]  # fmt: skip
    else:
        crossing_ok = all(m[p]["ratio_to_crossing"].get("farther_1pct", 0) == 0 for p in ("FAB", "DeepFool"))
        goals = [f"≥ 2x FAB: {_met(m['speedup_vs_FAB'] >= 2)}", f"≥ 99 % certified: {_met(m['certified'] >= 0.99)}",
                 f"none farther than 1.01 x a peer's crossing: {_met(crossing_ok)}"]  # fmt: skip
    if math.isfinite(m["speedup_vs_SLSQP"]):
        goals.insert(1, f"≥ 1000x SLSQP: {_met(m['speedup_vs_SLSQP'] >= 1000)}")
    else:
        goals.insert(1, "≥ 1000x SLSQP: not measured")
    return f"| {what} | {result} | {'; '.join(goals)} |"


def _attack_rows() -> list[str]:
    run = _load(RESULTS / "bench_attacks.json")
    if run is None:
        return []
    out = []
    for r in run["attack"]:
        if not r.get("record_metrics"):
            continue
        ceiling = r["one_at_a_time_ms_per_image_iter"] / r["direction_ms_per_image_batched"]
        what = (f"top-k attack, {r['iters']} iterations, {r['method']}, {r['config']}: batch of {r['images']} "
                f"images vs one at a time ({run['threads']} threads; `bench_attacks.json`)")  # fmt: skip
        result = (f"{_x(r['throughput_ratio'])} ({r['batched_images_per_s']:.1f} images/s); ceiling on this CPU "
                  f"(one-at-a-time time ÷ the batched step direction alone) {_x(ceiling)}")  # fmt: skip
        out.append(f"| {what} | {result} | ≥ 10x: {_met(r['throughput_ratio'] >= 10)} |")
    for r in run.get("ig_vs_captum", []):
        rel = r["max_abs_diff"] / r["max_abs_attr"]
        what = (f"integrated gradients vs Captum, {r['steps']} steps, {r['config']}, {r['images']} images "
                "(`bench_attacks.json`)")  # fmt: skip
        result = (f"max difference {r['max_abs_diff']:.3g} ({rel:.1g} of the largest attribution); Captum takes "
                  f"{r['speed_ratio_captum_over_flipfrag']:.2f}x our time")  # fmt: skip
        out.append(f"| {what} | {result} | not slower: {_met(r['speed_ratio_captum_over_flipfrag'] >= 1)} |")
    return out


#: The attack-loop benchmarks (benchmarks/bench_cifar_cnn.py): results file and the network it measured.
_LOOP_RUNS = (("bench_cifar_cnn.json", "pretrained CIFAR-10 CNN"),
              ("bench_imagenet.json", "ImageNet CNN EfficientNet-Lite0 at 224x224"))  # fmt: skip


def _loop_rows() -> list[str]:
    out = []
    for name, net in _LOOP_RUNS:
        run = _load(RESULTS / name)
        if run is None:
            continue
        p = run["parameters"]
        parts, ok = [], []
        for r in run["methods"]:
            beyond = r.get("overhead_a_over_d_plus_e")
            txt = f"{r['method']} {100 * r['overhead_a_over_d']:+.0f} %"
            if beyond is not None:
                txt += f" ({100 * beyond:+.0f} % beyond the model's map at every iterate)"
            if name != "bench_cifar_cnn.json":
                txt += f", {r['image_iters_per_s']['a_flipfrag']:.2f} image-iterations/s"
            parts.append(txt)
            ok.append((beyond if beyond is not None else r["overhead_a_over_d"]) <= 0.15)
        fair = max(r["fairness"]["objective_max_abs_diff"] for r in run["methods"])
        what = (f"top-k attack loop's time over the step direction alone, {net}, {p['images']} photos, "
                f"{p['iters']} iterations, {p['threads']} threads (`{name}`)")  # fmt: skip
        result = "; ".join(parts) + f"; the hand-written loop's objective differs by at most {fair:.1g} at every iterate"
        out.append(f"| {what} | {result} | ≤ 15 % beyond the model's map: {_met(all(ok))} |")
        rows = run.get("throughput") or []
        if rows:
            cells = "; ".join(f"batch {t['batch']}, {t['depthwise']}, {t['layout']}: {t['seconds_per_image_iter']:.2f} s "
                              f"per image-iteration, peak {t['peak_rss_gb']:.2f} GB" for t in rows)  # fmt: skip
            fits = sum(t["peak_rss_gb"] <= 2.0 for t in rows)
            out.append(f"| SG top-k attack step per image, {net}, each configuration in a fresh process (`{name}`) | "
                       f"{cells} | ≤ 2 GB resident (Binder): {fits} of {len(rows)} configurations |")  # fmt: skip
    return out


def render_speed() -> str:
    lines = ["| what | result | goal |", "|---|---|---|"]
    lines += [_flip_row(*row) for row in _flip_rows()]
    lines += _attack_rows() + _loop_rows()
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- cost


def render_cost() -> str:
    run = _load(RESULTS / "paper_cost.json")
    if run is None:
        return "Not measured yet (`python benchmarks/bench_paper_cost.py`)."
    pr, meta = run["projection"], run["meta"]
    share = {}
    for c in pr["cells"]:
        share[c["method"]] = share.get(c["method"], 0.0) + c["cpu_hours"]
    top, hours = max(share.items(), key=lambda kv: kv[1])
    models = ", ".join(sorted({f"{c['role']}: {c['model']}" for c in run["cells"] if c.get("model")}))
    if not models:  # a file from before the benchmark named its models: its CIFAR-10 role was a small stand-in CNN
        models = ("the CIFAR-10 role measured on a small stand-in CNN, not the pretrained CNN the paper profile runs: "
                  "re-run `python benchmarks/bench_paper_cost.py`")  # fmt: skip
    return (f"Measured on {meta['machine']} with {meta['threads']} threads (`paper_cost.json`, "
            f"{meta['bench_seconds']:.0f} s of benchmarking{'; ' + models if models else ''}): the whole paper profile "
            f"({pr['images']} images, {pr['iterations']} iterations, {pr['n_eps']} epsilons) projects to "
            f"{pr['total_cpu_hours']:,.0f} CPU-hours, {100 * hours / pr['grid_cpu_hours']:.0f} % of it {top}; from "
            f"the counted FLOPs, an *estimated* {pr['total_gpu_hours']:,.0f} GPU-hours at an assumed sustained "
            f"{meta['gpu_tflops']:g} TFLOP/s. One flip point for each of {pr['flip']['points']:,} MNIST training "
            f"inputs: {pr['flip']['cpu_hours']:.1f} CPU-hours.")  # fmt: skip


# ------------------------------------------------------------------------------------------------ beyond

_NAMES = {"gradient": "SG", "integrated_gradients": "IG", "deeplift": "DeepLIFT", "dtd": "DTD"}


def render_beyond(folder: Path | None = None) -> str:
    """Study 1 read off its table, with the direction spelled out: ρ(distance, ∩) > 0 means a smaller distance goes
    with a smaller ∩, i.e. inputs nearer the boundary have the *more* fragile maps."""
    folder = folder or ROOT / "figures"
    path = folder / "beyond" / "table_boundary_vs_fragility.csv"
    if not path.exists():
        return "Not run yet (`notebooks/beyond/01_boundary_vs_fragility.ipynb`)."
    t = pd.read_csv(path)
    sentences = []
    for model, g in t.groupby("model", sort=False):
        n = int(g.n.max())
        for y, what in (("topk_attack", "the top-k attack"), ("topk_random", "random sign noise")):
            rows = g[(g.x == "distance") & (g.y == y)]
            found = rows[rows.relation != "none found"]
            parts = []
            for _, r in found.iterrows():
                way = "more" if r.rho > 0 else "less"
                parts.append(f"{_NAMES.get(r.method, r.method)} ρ = {r.rho:+.2f} [{r.low:+.2f}, {r.high:+.2f}]: inputs "
                             f"nearer the boundary have the {way} fragile maps")  # fmt: skip
            none = [_NAMES.get(m, m) for m in rows[rows.relation == "none found"].method]
            if none:
                parts.append(f"no relation found for {', '.join(none)} (intervals containing 0)")
            sentences.append(f"{model} (n = {n}), distance vs top-k ∩ under {what}: " + "; ".join(parts) + ".")
        cur = g[(g.x == "curvature") & (g.y == "topk_attack")]
        parts = []
        for _, r in cur.iterrows():
            txt = f"{_NAMES.get(r.method, r.method)} {r.rho:+.2f} [{r.low:+.2f}, {r.high:+.2f}]"
            if r.relation != "none found":  # ρ > 0: the more curved images keep more of their top-k: less fragile
                txt += ": the more curved images are the " + ("less" if r.rho > 0 else "more") + " fragile"
            parts.append(txt)
        if parts:
            sentences.append(f"{model}, curvature |λ_max| vs top-k ∩ after the attack (the Hessian argument read per "
                             "image predicts ρ < 0): " + "; ".join(parts) + ".")  # fmt: skip
    n_int = int(((t.x == "distance") & t.y.isin(["topk_attack", "topk_random"])).sum())
    n_found = int(((t.x == "distance") & t.y.isin(["topk_attack", "topk_random"]) & (t.relation != "none found")).sum())
    sentences.append(f"Intervals excluding 0 among the {n_int} of distance: {n_found} (95 % percentile bootstrap, not "
                     "corrected for multiple comparisons).")  # fmt: skip
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------ prose check

#: Tokens with digits that README prose may use: names of things (data sets, models, papers, versions), the paper's
#: own settings (ε = 8/255, k = 1000, M = 100, 227x227), units and ranges of the inputs. Measured results are not here.
ALLOWED_IN_PROSE = re.compile(
    r"""(?x)
    arXiv:\d{4}\.\d{4,5} | \b(?:19|20)\d\d\b | AAAI | \bv[12]\b
    | CIFAR-1?00? | MNIST(?:-5k|\ 5k)? | ResNet-\d+ | Inception[\ -]v3 | EfficientNet-Lite0 | ReLU6 | SqueezeNet(?:\ 1\.0)?
    | squeezenet1_0 | inception_v3 | ILSVRC-2012 | ReScience(?:\ C)? | Python\ 3\.\d+ | torch(?:vision)?==[\d.]+
    | cifar-10-model(?:==|\ )[\d.]+ | \bE\d\b | \bF\d[ab]?\b | §\s?\d(?:\.\d)? | \bissue\ \d+ | \d+x\d+(?:x\d+)?
    | \d+-\d+(?:-\d+)+ | \[0,\ 1\] | 0[–-]255 | \d+/255 | \bε\ =\ \d+(?:/255)? | \bk\ =\ \d+ | \bM\ =\ \d+ | β\ =\ \d+
    | 1\.01\ × | \d+\ %\ of\ the\ closest | PROFILE=\w+ | SEED=\d | local:N | 8786 | 8899 | 8888 | 8000
    | \bL[12∞]\b | \b2-D\b | \b[Oo]ne\b | top-\d+ | \d+\ CPU\ cores | \d+-core | \bfp\d\d | float(?:32|64)
    | \b1\ %\ | \b99\ % | 2\ CPU | \bbeta\ =\ 1 | \bstep\ \d | ^\s*\d\.\ | \bpaper\ [12]\b | paper\ [12]'s
    | \bsha256\b | \d+×\d+ | \bseed\ 0\b | \b(?:flip_points|fragility|beyond)/\d\d\b | \b2-core\b
    """
)
_BLOCK = re.compile(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", re.S)
_FENCE = re.compile(r"```.*?```", re.S)
_INLINE = re.compile(r"`[^`\n]*`")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")


def prose_number_problems(text: str) -> list[str]:
    """Lines of README prose that carry a figure (a digit) outside generated blocks, code (fenced or inline), link
    targets and :data:`ALLOWED_IN_PROSE`. Each problem names the line and the token."""
    for pattern in (_BLOCK, _FENCE):
        text = pattern.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    problems = []
    for i, line in enumerate(text.splitlines(), 1):
        rest = ALLOWED_IN_PROSE.sub(" ", _LINK_TARGET.sub("]", _INLINE.sub(" ", line)))
        for tok in re.findall(r"\S*\d\S*", rest):
            problems.append(f"README.md:{i}: {tok!r} in {line.strip()[:100]!r}")
    return problems
