"""Headline claims: notebooks record them, ``REPRODUCTION.md`` is generated from them (never edited by hand).

A notebook calls :func:`record_claim` for every headline claim it tests. The verdict is **derived**, never typed in:
the row stores the claim's kind and the numbers (or conditions) the verdict follows from, by one written rule per
kind (``docs/papers/README.md``, "Verdict rules"):

* ``kind="numeric"`` — the paper gives a number ``p`` (or one per method: a mapping), we measure ``o``; the claim
  states a ``tolerance`` ``t`` and the ``reference`` ``r`` that means "no effect". Per number:
  ``|o - r| <= t < |p - r|`` (indistinguishable from no effect, unlike the paper's number) -> "not reproduced";
  else ``|o - p| <= t`` -> "reproduced"; else ``(o - r) * sign(p - r) > t`` (moved away from "no effect" in the
  paper's direction, by more than the tolerance) -> "partly"; else "not reproduced". Several numbers: the weakest
  verdict (:func:`numeric_verdict`).
* ``kind="qualitative"`` — the paper states a property without a number; ``conditions`` maps each operational
  condition (stated in words) to True/False: all true -> "holds", else "does not hold" (:func:`qualitative_verdict`).
* ``kind="measured"`` — nothing of the paper's to compare with: "measured only".

:func:`derive_verdict` recomputes a stored row's verdict from its fields; ``tests/test_report.py`` applies it to
every row of ``figures/claims.json``. A row whose text says "does not hold" / "not reproduced" can never carry a
softer verdict (:func:`record_claim` raises).

Backward compatibility: the old call ``record_claim(..., verdict="...")`` without ``kind`` is still accepted (the
fragility notebooks use it until they switch): "no paper number" becomes a ``measured`` row; every other old verdict
is stored as ``kind="legacy"`` (shown as "… (not derived)" in REPRODUCTION.md; a text saying "does not hold" forces
"does not hold" / "not reproduced").

``python -m flipfrag.report`` (run by ``make figures``) writes ``<figures_dir>/REPRODUCTION.md`` from
``claims.json`` and ``MANIFEST.json``: per paper a short table (claim, paper, ours, verdict), then per notebook its
substitutions and deviations (each once), the verdict rules and evidence tags with links to ``docs/papers/``, and
the runtime of every notebook.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import atomic_write
from ._options import Options
from .plotting import current_run, figures_dir, locked_json_store, read_json_store, read_manifest

__all__ = [
    "KINDS",
    "VERDICTS",
    "NUMERIC_VERDICTS",
    "numeric_verdict",
    "qualitative_verdict",
    "derive_verdict",
    "record_claim",
    "ClaimNotes",
    "read_claims",
    "render_reproduction",
    "write_reproduction",
    "verdict_between",
    "render_claims_table",
    "render_runtimes",
    "update_readme",
    "render_readme",
    "NOTEBOOK_OUTPUTS",
    "check_claim_row",
]

KINDS = ("numeric", "qualitative", "measured")
#: Strongest first: a claim with several numbers gets the weakest of their verdicts.
NUMERIC_VERDICTS = ("reproduced", "partly", "not reproduced")
QUALITATIVE_VERDICTS = ("holds", "does not hold")
MEASURED_VERDICT = "measured only"
VERDICTS = (*NUMERIC_VERDICTS, *QUALITATIVE_VERDICTS, MEASURED_VERDICT)
#: Verdicts of the old API (``record_claim(verdict=...)`` without ``kind``).
LEGACY_VERDICTS = ("reproduced", "partly", "not reproduced", "no paper number", "qualitative only")
_SECTIONS = ("claims", "substitutions")
NOT_AVAILABLE = "not available offline"
#: Phrases that mark a negative result in a claim's text; such a row cannot get a softer verdict.
_NEGATIVE = re.compile(r"\bdoes not hold\b|\bnot reproduced\b", re.IGNORECASE)
_NEGATIVE_VERDICTS = ("not reproduced", "does not hold")
PAPERS_DOC = "docs/papers"


# ----------------------------------------------------------------------------------- what each notebook produces

#: The figure/table ids (MANIFEST entries) and claim ids each notebook must produce — in every profile. The notebook
#: smoke test (tests/notebooks/test_smoke.py) checks each run against this list in both directions (nothing missing,
#: nothing undeclared), so a notebook and its entry here cannot drift apart; tests/test_report.py checks the committed
#: figures/ against it. ``smoke_omits``: ids a notebook does not produce in the smoke profile (e.g. a claim at an
#: epsilon the smoke grid does not run); ``quick_omits`` the same for the quick profile.
NOTEBOOK_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "00_data_overview": {
        "items": (
            "beyond/fig_data_samples",
            "beyond/table_data",
        ),
        "claims": (),
    },
    "beyond/01_boundary_vs_fragility": {
        "items": (
            "beyond/fig_boundary_vs_fragility",
            "beyond/table_boundary_vs_fragility",
        ),
        "claims": (
            "beyond/boundary_curvature_mediator",
            "beyond/boundary_fragility_corr",
            "beyond/flip_points_certified",
        ),
    },
    "beyond/02_flip_explanation_fragility": {
        "items": (
            "beyond/fig_flip_explanation_examples",
            "beyond/fig_flip_explanation_fragility",
            "beyond/fig_flip_target_survival",
            "beyond/table_flip_explanation_fragility",
        ),
        "claims": (
            "beyond/flip_explanation_fragility",
            "beyond/flip_relu_surrogate_direction",
            "beyond/flip_target_survival",
        ),
    },
    "beyond/03_defenses": {
        "items": (
            "beyond/fig_defenses_examples",
            "beyond/fig_defenses_examples_imagenet",
            "beyond/fig_defenses_plane",
            "beyond/table_defenses",
        ),
        "claims": (
            "beyond/defense_beta_deeplift",
            "beyond/defense_beta_gradient",
            "beyond/defense_certificate",
            "beyond/defense_deeplift",
            "beyond/defense_gradient",
            "beyond/defense_quantus_ranking",
            "beyond/defense_smoothgrad_deeplift",
            "beyond/defense_smoothgrad_gradient",
            "beyond/defense_sparsified_smoothgrad_gradient",
        ),
    },
    "flip_points/01_models": {
        "items": ("flip_points/table_models",),
        "claims": (
            "flip_points/claim1_certified",
            "flip_points/claim7_accuracy",
        ),
    },
    "flip_points/02_confidence": {
        "items": (
            "flip_points/fig_confidence",
            "flip_points/table_confidence",
        ),
        "claims": ("flip_points/claim2_confidence",),
    },
    "flip_points/03_features": {
        "items": ("flip_points/fig_features",),
        "claims": ("flip_points/claim_features",),
    },
    "flip_points/04_bias": {
        "items": ("flip_points/table_bias",),
        "claims": ("flip_points/claim_bias",),
    },
    "flip_points/05_adversarial": {
        "items": ("flip_points/fig_adversarial",),
        "claims": ("flip_points/claim6_adversarial",),
    },
    "flip_points/06_influential_training": {
        "items": ("flip_points/fig_influential_training",),
        "claims": ("flip_points/claim5_influential_training",),
    },
    "flip_points/07_pca_rrqr": {
        "items": (
            "flip_points/fig_pca",
            "flip_points/table_rrqr",
        ),
        "claims": (
            "flip_points/claim3_pca",
            "flip_points/claim4_rrqr",
        ),
    },
    "flip_points/08_model_agnostic": {
        "items": ("flip_points/fig_model_agnostic",),
        "claims": ("flip_points/claim_model_agnostic",),
    },
    "flip_points/09_homotopy": {
        "items": ("flip_points/fig_homotopy",),
        "claims": ("flip_points/claim_homotopy",),
    },
    "fragility/01_examples": {
        "items": ("fragility/fig_examples",),
        "claims": (),
    },
    "fragility/02_geometry_toy": {
        "items": ("fragility/fig_geometry_toy",),
        "claims": (),
    },
    "fragility/03_imagenet_grid": {
        "items": (
            "beyond/table_surrogate_fidelity",
            "fragility/fig_imagenet_grid",
            "fragility/fig_imagenet_grid_scale",
            "fragility/table_convergence",
            "fragility/table_imagenet_cells",
            "fragility/table_imagenet_grid",
            "fragility/table_imagenet_grid_scale",
        ),
        "claims": (
            "fragility/claim1_random_topk_eps8",
            "fragility/claim1b_random_spearman_eps8",
            "fragility/claim2_topk_eps8",
            "fragility/claim2b_topk_eps1",
            "fragility/claim3_center_shift_eps8",
            "fragility/claim3b_topk_center_shift_eps8",
            "fragility/claim3c_center_vs_random",
            "fragility/claim4_strongest_spearman_eps8",
            "fragility/claim5_shape",
            "fragility/claim6_label_kept",
            "fragility/claim9_dtd",
            "fragility/imagenet_surrogate_beta",
            # the committed paper-scale cells (fragility.scale_claims): a claim appears once a cell it needs is
            # complete — scale_claim5_shape (SG / DeepLIFT / IG top-k and center at ε = 2 and 8) is not yet, and is
            # declared here when they are committed
            "fragility/scale_claim1_random_topk_eps8",
            "fragility/scale_claim1b_random_spearman_eps8",
            "fragility/scale_claim2_topk_eps8",
            "fragility/scale_claim2b_topk_eps1",
            "fragility/scale_claim3_center_shift_eps8",
            "fragility/scale_claim3b_topk_center_shift_eps8",
            "fragility/scale_claim3c_center_vs_random",
            "fragility/scale_claim4_strongest_spearman_eps8",
            "fragility/scale_claim6_label_kept",
            "fragility/scale_claim9_dtd",
        ),
        "smoke_omits": ("fragility/claim2b_topk_eps1",),  # the smoke grid has no eps = 1
        "quick_omits": ("fragility/claim2b_topk_eps1",),  # nor the quick one: eps in {0, 2, 8}/255 (20-minute build)
    },
    "fragility/04_cifar_grid": {
        "items": (
            "fragility/fig_cifar_grid",
            "fragility/table_cifar_grid",
        ),
        "claims": ("fragility/claim7_cifar_less_fragile", "fragility/claim7b_dimension_mnist"),
    },
    "fragility/05_targeted": {
        "items": ("fragility/fig_targeted",),
        "claims": ("fragility/claim10_targeted",),
    },
    "fragility/06_influence": {
        "items": (
            "fragility/fig_influence_curves",
            "fragility/fig_influence_examples",
            "fragility/table_influence",
        ),
        "claims": (
            "fragility/claim8_influence_top5_eps8",
            "fragility/claim8b_influence_spearman_eps8",
            "fragility/claim8c_influence_random_eps10",
            "fragility/claim8d_influence_accuracy",
        ),
    },
    "quickstart": {
        "items": ("beyond/fig_quickstart",),
        "claims": (),
    },
    "fragility/07_hessian": {
        "items": ("fragility/fig_hessian",),
        "claims": ("fragility/geometry_hessian",),
    },
}


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt_numbers(values: float | Mapping[str, float]) -> str:
    if isinstance(values, Mapping):
        return " / ".join(f"{k} {v:.3g}" for k, v in values.items())
    return f"{values:.3g}"


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _components(name: str, value: Any, keys: list[str] | None) -> dict[str, float]:
    """A number or a mapping of numbers as {component: float}; a scalar with ``keys`` is broadcast."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{name} must not be empty")
        out = {str(k): _finite(f"{name}[{k!r}]", v) for k, v in value.items()}
        if keys is not None and list(out) != keys:
            raise ValueError(f"{name} has components {list(out)}, paper_value has {keys}")
        return out
    v = _finite(name, value)
    return {k: v for k in keys} if keys is not None else {"": v}


#: Float slack of the comparisons, so that e.g. 0.26 vs 0.21 counts as "within 0.05" (0.26 - 0.21 > 0.05 in binary).
_SLACK = 1e-9


def _one_numeric(paper: float, ours: float, tolerance: float, reference: float) -> str:
    if abs(ours - reference) <= tolerance + _SLACK < abs(paper - reference):
        return "not reproduced"  # indistinguishable from no effect, where the paper's number is not
    if abs(ours - paper) <= tolerance + _SLACK:
        return "reproduced"
    direction = math.copysign(1.0, paper - reference) if paper != reference else 0.0
    if direction != 0.0 and (ours - reference) * direction > tolerance:
        return "partly"
    return "not reproduced"


def numeric_verdict(
    paper: float | Mapping[str, float],
    ours: float | Mapping[str, float],
    *,
    tolerance: float | Mapping[str, float],
    reference: float | Mapping[str, float],
) -> str:
    """The verdict of a numeric claim (rule in the module docstring and ``docs/papers/README.md``).

    ``paper`` and ``ours`` are numbers or mappings with the same keys (e.g. ``{"SG": .., "DL": .., "IG": ..}``);
    ``tolerance`` (>= 0) and ``reference`` (the "no effect" value) are numbers or mappings with those keys.

    >>> numeric_verdict(0.21, 0.25, tolerance=0.05, reference=1.0)
    'reproduced'
    >>> numeric_verdict({"SG": 0.21, "IG": 0.26}, {"SG": 0.25, "IG": 0.6}, tolerance=0.05, reference=1.0)
    'partly'
    """
    p = _components("paper_value", paper, None)
    keys = list(p) if isinstance(paper, Mapping) else None
    o = _components("ours", ours, keys)
    t = _components("tolerance", tolerance, keys)
    r = _components("reference", reference, keys)
    if keys is None:  # scalar claim: every field scalar
        for name, value in (("ours", ours), ("tolerance", tolerance), ("reference", reference)):
            if isinstance(value, Mapping):
                raise ValueError(f"{name} is a mapping but paper_value is a single number")
    for k, tk in t.items():
        if tk < 0:
            raise ValueError(f"tolerance must be >= 0, got {tk} for {k or 'the claim'}")
    verdicts = [_one_numeric(p[k], o[k], t[k], r[k]) for k in p]
    return max(verdicts, key=NUMERIC_VERDICTS.index)


def qualitative_verdict(conditions: Mapping[str, bool]) -> str:
    """'holds' if every stated condition is true, else 'does not hold'.

    ``conditions`` maps a condition stated in words (e.g. "misclassified closer in median, every model") to a bool.
    """
    if not isinstance(conditions, Mapping) or not conditions:
        raise ValueError("conditions must be a non-empty mapping {condition in words: bool}")
    for name, ok in conditions.items():
        if not isinstance(ok, bool):
            raise TypeError(f"conditions[{name!r}] must be a bool, got {type(ok).__name__} {ok!r}")
    return "holds" if all(conditions.values()) else "does not hold"


def derive_verdict(row: Mapping[str, Any]) -> str:
    """Recompute a stored claims row's verdict from its fields (``kind``, ``numbers`` / ``conditions``)."""
    kind = row.get("kind")
    if kind == "numeric":
        n = row["numbers"]
        return numeric_verdict(n["paper"], n["ours"], tolerance=n["tolerance"], reference=n["reference"])
    if kind == "qualitative":
        return qualitative_verdict(row["conditions"])
    if kind == "measured":
        return MEASURED_VERDICT
    raise ValueError(f"claim {row.get('id')!r}: kind {kind!r} has no written verdict rule (kinds: {KINDS})")


def _check_text(claim_id: str, verdict: str, *texts: str) -> None:
    text = " ".join(t for t in texts if t)
    if _NEGATIVE.search(text) and verdict not in _NEGATIVE_VERDICTS:
        raise ValueError(
            f"claim {claim_id!r}: its text says {_NEGATIVE.search(text).group(0)!r} but the verdict would be "
            f"{verdict!r}; a negative result cannot get a softer verdict"
        )


def _legacy(claim_id: str, verdict: str, text: str) -> tuple[str, str]:
    if verdict not in LEGACY_VERDICTS:
        raise ValueError(f"verdict must be one of {LEGACY_VERDICTS} (old API) — better: pass kind=, got {verdict!r}")
    if verdict == "no paper number":
        return "measured", MEASURED_VERDICT
    if _NEGATIVE.search(text) and verdict not in _NEGATIVE_VERDICTS:
        return "legacy", "does not hold" if verdict == "qualitative only" else "not reproduced"
    return "legacy", verdict


@dataclass(frozen=True)
class ClaimNotes(Options):
    """The words around a claim's numbers in its ``REPRODUCTION.md`` row (the ``options`` of :func:`record_claim`;
    its keywords ``source=``, ``note=``, ``deviation=`` override them).

    ``source``: where the paper's value comes from, with an evidence tag (e.g. "F3 [FIG]", see
    ``docs/papers/README.md``); ``note``: a claim-specific remark on the row; ``deviation``: listed once per
    notebook."""

    source: str = ""
    note: str = ""
    deviation: str = ""

    def __post_init__(self) -> None:
        for name in ("source", "note", "deviation"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")


def record_claim(
    claim_id: str,
    *,
    claim: str,
    paper_value: Any = None,
    ours: Any,
    kind: str | None = None,
    tolerance: float | Mapping[str, float] | None = None,
    reference: float | Mapping[str, float] | None = None,
    conditions: Mapping[str, bool] | None = None,
    verdict: str | None = None,
    options: ClaimNotes | None = None,
    **overrides: str,
) -> dict[str, Any]:
    """Record one headline claim for ``REPRODUCTION.md`` (id like ``"fragility/claim1"``); the verdict is derived.

    ``kind="numeric"``: ``paper_value`` and ``ours`` are numbers or mappings (same keys), with ``tolerance`` and
    ``reference`` (see :func:`numeric_verdict`). ``kind="qualitative"``: ``paper_value`` is the paper's statement in
    words, ``ours`` our result in words, ``conditions`` the operational test ({condition: bool}). ``kind="measured"``:
    ``paper_value=None`` (not available offline) and ``ours`` in words or as a number. ``source`` says where the
    paper's value comes from, with an evidence tag (e.g. "F3 [FIG]", see ``docs/papers/README.md``); ``note`` adds
    a claim-specific remark to the table row; ``deviation`` is listed once per notebook. A ``verdict`` passed along
    with ``kind`` must equal the derived one. Without ``kind``, ``verdict`` is the old API (see the module
    docstring). Profile, notebook and substitutions come from the current run. ``source``, ``note`` and
    ``deviation`` are the fields of :class:`ClaimNotes` (``options``), given as keywords.
    """
    notes = ClaimNotes.resolve(options, overrides)
    source, note, deviation = notes.source, notes.note, notes.deviation
    entry: dict[str, Any] = {"id": claim_id, "claim": claim, "source": source}
    legacy_call = kind is None
    if legacy_call:
        if verdict is None:
            raise ValueError(f"claim {claim_id!r}: pass kind= ({KINDS}); the verdict is derived from it")
        if paper_value is None and verdict in NUMERIC_VERDICTS:
            raise ValueError(f"verdict {verdict!r} needs a paper_value; use 'no paper number' or 'qualitative only'")
        kind, verdict = _legacy(claim_id, verdict, f"{claim} {_fmt(ours)} {note}")
        entry.update(paper=_fmt(paper_value), ours=_fmt(ours))
    elif kind == "numeric":
        if paper_value is None or tolerance is None or reference is None:
            raise ValueError(f"claim {claim_id!r}: a numeric claim needs paper_value, tolerance and reference")
        derived = numeric_verdict(paper_value, ours, tolerance=tolerance, reference=reference)
        keys = list(paper_value) if isinstance(paper_value, Mapping) else None
        fields = {"paper": paper_value, "ours": ours, "tolerance": tolerance, "reference": reference}
        comps = {name: _components(name, v, keys) for name, v in fields.items()}
        numbers: dict[str, Any] = {name: (c if keys is not None else c[""]) for name, c in comps.items()}
        direction = {k: _direction(comps["paper"][k], comps["reference"][k]) for k in comps["paper"]}
        numbers["direction"] = direction if keys is not None else direction[""]
        entry.update(paper=_fmt_numbers(numbers["paper"]), ours=_fmt_numbers(numbers["ours"]), numbers=numbers)
        verdict = _agree(claim_id, verdict, derived)
    elif kind == "qualitative":
        if conditions is None:
            raise ValueError(f"claim {claim_id!r}: a qualitative claim needs conditions {{condition: bool}}")
        derived = qualitative_verdict(conditions)
        entry.update(paper=_fmt(paper_value), ours=_fmt(ours), conditions={str(k): v for k, v in conditions.items()})
        verdict = _agree(claim_id, verdict, derived)
    elif kind == "measured":
        if paper_value is not None:
            raise ValueError(f"claim {claim_id!r}: a measured claim has no paper_value (got {paper_value!r})")
        entry.update(paper=NOT_AVAILABLE, ours=_fmt(ours))
        verdict = _agree(claim_id, verdict, MEASURED_VERDICT)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not legacy_call:
        _check_text(claim_id, verdict, claim, entry["ours"], note)
    run = current_run()
    entry.update(kind=kind, verdict=verdict, note=note, deviation=deviation, profile=run.profile, notebook=run.notebook)
    with locked_json_store(run.figures_dir / "claims.json", _SECTIONS) as store:
        store["claims"][claim_id] = entry
        run.claims.add(claim_id)
        if run.substitutions:
            store["substitutions"][run.notebook] = run.substitutions
    return entry


def _direction(paper: float, reference: float) -> str:
    return "down" if paper < reference else "up" if paper > reference else "none"


def _agree(claim_id: str, given: str | None, derived: str) -> str:
    if given is not None and given != derived:
        raise ValueError(f"claim {claim_id!r}: verdict {given!r} given, but the rule gives {derived!r}")
    return derived


#: Fields every claims row has; numeric rows also ``numbers``, qualitative rows ``conditions``.
ROW_FIELDS = ("id", "claim", "paper", "source", "ours", "kind", "verdict", "note", "deviation", "profile", "notebook")


def check_claim_row(row: Mapping[str, Any]) -> list[str]:
    """Problems of one stored claims row (empty list = well formed): fields, kind, and a verdict that follows from
    the stored numbers by the written rule (legacy rows: an old verdict, never softer than their text)."""
    cid = row.get("id", "?")
    problems = [f"{cid}: missing field {f!r}" for f in ROW_FIELDS if f not in row]
    if problems:
        return problems
    if not all(isinstance(row[f], str) for f in ROW_FIELDS):
        problems.append(f"{cid}: every field of {ROW_FIELDS} must be a string")
    kind = row["kind"]
    if kind == "legacy":
        if row["verdict"] not in (*LEGACY_VERDICTS, *_NEGATIVE_VERDICTS):
            problems.append(f"{cid}: legacy verdict {row['verdict']!r}")
    elif kind in KINDS:
        try:
            derived = derive_verdict(row)
        except (KeyError, TypeError, ValueError) as err:
            return [*problems, f"{cid}: cannot re-derive the verdict ({type(err).__name__}: {err})"]
        if derived != row["verdict"]:
            problems.append(f"{cid}: stored verdict {row['verdict']!r}, the rule gives {derived!r}")
    else:
        problems.append(f"{cid}: kind {kind!r} not in {KINDS}")
    text = f"{row['claim']} {row['ours']} {row['note']}"
    if _NEGATIVE.search(text) and row["verdict"] not in _NEGATIVE_VERDICTS:
        problems.append(f"{cid}: text says {_NEGATIVE.search(text).group(0)!r}, verdict {row['verdict']!r}")
    return problems


def read_claims(folder: str | Path | None = None) -> dict[str, Any]:
    return read_json_store(figures_dir(folder) / "claims.json", _SECTIONS)


def verdict_between(paper: float, ours: float, *, rel: float = 0.25, abs_tol: float = 0.05) -> str:
    """Old rule, kept until the fragility drivers switch to ``kind="numeric"``: 'reproduced' within
    max(rel·|paper|, abs_tol) of the paper, 'partly' within 3× that, else 'not reproduced' (no direction)."""
    tol = max(rel * abs(paper), abs_tol)
    gap = abs(ours - paper)
    if gap <= tol:
        return "reproduced"
    return "partly" if gap <= 3 * tol else "not reproduced"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _docs_link(folder: Path, name: str = "") -> str:
    import os

    root = Path(__file__).resolve().parent.parent
    return Path(os.path.relpath(root / PAPERS_DOC, folder.resolve())).as_posix() + (f"/{name}" if name else "")


_PAPER_NOTES = {"flip_points": "flip_points.md", "fragility": "fragility.md"}


def _verdict_cell(c: Mapping[str, Any]) -> str:
    v = c["verdict"]
    return f"{v} (not derived)" if c.get("kind", "legacy") == "legacy" else v


def render_claims_table(claims: Mapping[str, Any], paper: str) -> list[str]:
    """The short per-claim table of one paper (claim, paper, ours, verdict) — REPRODUCTION.md and README.md."""
    lines = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    for cid, c in sorted(claims.items()):
        if cid.split("/")[0] != paper:
            continue
        paper_cell = c["paper"] + (f" ({c['source']})" if c.get("source") else "")
        ours_cell = c["ours"] + (f"; {c['note']}" if c.get("note") else "")
        if c.get("conditions"):
            ours_cell += " — test: " + "; ".join(f"{'✓' if ok else '✗'} {k}" for k, ok in c["conditions"].items())
        cells = (c["claim"], paper_cell, ours_cell, _verdict_cell(c))
        lines.append("| " + " | ".join(_md_escape(v) for v in cells) + " |")
    return lines


def _verdict_counts(claims: Mapping[str, Any], paper: str) -> str:
    counts: dict[str, int] = {}
    for cid, c in claims.items():
        if cid.split("/")[0] == paper:
            counts[_verdict_cell(c)] = counts.get(_verdict_cell(c), 0) + 1
    order = [*VERDICTS, *(f"{v} (not derived)" for v in (*LEGACY_VERDICTS, *VERDICTS))]
    return ", ".join(f"{counts[v]} {v}" for v in sorted(counts, key=lambda v: order.index(v) if v in order else 99))


def render_reproduction(folder: str | Path | None = None) -> str:
    """The text of REPRODUCTION.md for a figures folder."""
    folder = figures_dir(folder)
    store, manifest = read_claims(folder), read_manifest(folder)
    claims = store["claims"]
    docs = _docs_link(folder)
    lines = [
        "# REPRODUCTION — claims, our numbers, verdicts",
        "",
        "Generated by `python -m flipfrag.report` from `claims.json` (filled by the notebooks) and `MANIFEST.json`;",
        "do not edit by hand. Where the paper column says **not available offline**, the paper's number could not",
        f"be read (see [{PAPERS_DOC}/README.md]({docs}/README.md)): the claim is then tested as a qualitative claim",
        "or recorded as measured only. Section numbers (§) in the sources refer to the paper notes:",
        f"[flip_points.md]({docs}/flip_points.md) and [fragility.md]({docs}/fragility.md).",
        "",
    ]
    profiles = sorted({c["profile"] for c in claims.values()})
    if profiles:
        lines += [f"Profile: {', '.join(profiles)}.", ""]
    papers = sorted({cid.split("/")[0] for cid in claims})
    for paper in papers:
        notes = _PAPER_NOTES.get(paper)
        title = f"## {paper}" + (f" ([paper notes]({docs}/{notes}))" if notes else "")
        lines += [
            title,
            "",
            f"Verdicts: {_verdict_counts(claims, paper)}.",
            "",
            *render_claims_table(claims, paper),
            "",
        ]
    lines += _render_deviations(claims, store["substitutions"])
    lines += _render_rules(docs)
    if manifest["notebooks"]:
        total = sum(info["runtime_s"] for info in manifest["notebooks"].values())
        lines += ["## Notebooks run", "", f"Total runtime: {total:.0f} s.", "",
                  "| notebook | profile | seed | runtime (s) |", "|---|---|---|---|"]  # fmt: skip
        for nb, info in manifest["notebooks"].items():
            lines.append(f"| `{nb}` | {info['profile']} | {info['seed']} | {info['runtime_s']:.1f} |")
        lines.append("")
    if manifest["entries"]:
        lines += ["## Figures and tables", "", "| id | files | notebook | profile |", "|---|---|---|---|"]
        for item_id, e in manifest["entries"].items():
            files = ", ".join(f"[{Path(f).name}]({f})" for f in e["files"])
            lines.append(f"| `{item_id}` | {files} | `{e['notebook']}` | {e['profile']} |")
        lines.append("")
    return "\n".join(lines)


def _render_deviations(claims: Mapping[str, Any], substitutions: Mapping[str, str]) -> list[str]:
    """Each distinct substitution once (with the notebooks that make it), then per notebook each distinct deviation
    once (with the claims it concerns, or "all claims")."""
    lines: list[str] = []
    by_text: dict[str, list[str]] = {}
    for nb, text in sorted(substitutions.items()):
        by_text.setdefault(text, []).append(nb)
    if by_text:
        lines += ["## Substitutions (a different dataset or model than the paper's)", ""]
        for text, nbs in by_text.items():
            lines.append(f"- {', '.join(f'`{nb}`' for nb in nbs)}: {_md_escape(text)}")
        lines.append("")
    by_nb: dict[str, dict[str, list[str]]] = {}
    for cid, c in sorted(claims.items()):
        if c.get("deviation"):
            by_nb.setdefault(c["notebook"], {}).setdefault(c["deviation"], []).append(cid.split("/", 1)[-1])
    if by_nb:
        lines += ["## Deviations, per notebook", ""]
        for nb in sorted(by_nb):
            n_claims = sum(1 for c in claims.values() if c["notebook"] == nb)
            lines.append(f"- **`{nb}`**")
            for text, ids in by_nb[nb].items():
                scope = "all claims" if len(ids) == n_claims and n_claims > 1 else ", ".join(ids)
                lines.append(f"  - ({scope}) {_md_escape(text)}")
        lines.append("")
    return lines


def _render_rules(docs: str) -> list[str]:
    return [
        "## How the verdicts are derived",
        "",
        f"One rule per kind of claim ([{PAPERS_DOC}/README.md]({docs}/README.md#verdict-rules)); `claims.json`",
        "stores each row's kind and numbers, and `tests/test_report.py` recomputes every verdict from them.",
        "",
        "- **numeric** (paper number `p`, ours `o`, stated tolerance `t`, reference `r` = the value of no effect):",
        "  `|o − r| ≤ t < |p − r|` (no effect, unlike the paper) → not reproduced; else `|o − p| ≤ t` →",
        "  reproduced; else `(o − r)·sign(p − r) > t` → partly (the effect is there, not its size); else → not",
        "  reproduced. A claim with several numbers (e.g. SG / DL / IG) gets the weakest verdict.",
        "- **qualitative** (the paper states a property): the notebook's stated conditions all true → holds, else does",
        "  not hold.",
        "- **measured** (no paper number): measured only.",
        "- A verdict marked *(not derived)* was typed in by a notebook that still uses the old API.",
        "",
        f"Evidence tags in the paper column ([ABS], [FIG], [CODE], [PAPER-3P], [RECON], …) are defined in "
        f"[{PAPERS_DOC}/README.md]({docs}/README.md#evidence-tags).",
        "",
    ]


def render_runtimes(folder: str | Path | None = None) -> str:
    """One sentence with the measured runtimes of ``MANIFEST.json`` (total and per notebook folder)."""
    nbs = read_manifest(folder)["notebooks"]
    if not nbs:
        return "No notebook runtimes recorded in `figures/MANIFEST.json`."
    groups: dict[str, float] = {}
    for nb, info in nbs.items():
        group = nb.split("/")[0] if "/" in nb else "other"
        groups[group] = groups.get(group, 0.0) + info["runtime_s"]
    profiles = sorted({info["profile"] for info in nbs.values()})
    total = sum(groups.values())
    parts = ", ".join(f"{g} {t:.0f} s" for g, t in sorted(groups.items()))
    return (f"Measured (`figures/MANIFEST.json`, profile {'/'.join(profiles)}): {len(nbs)} notebooks in {total:.0f} s "
            f"of notebook time ({parts}). " + render_provenance(folder))  # fmt: skip


def render_provenance(folder: str | Path | None = None) -> str:
    """Sentences on where the figures come from (``MANIFEST.json``): the code version each was made with (commit,
    uncommitted changes) and, per kind of cached work unit, how many came from the cache and how many were computed
    (notebook totals), with the source hash of the code they depend on."""
    manifest = read_manifest(folder)
    entries = manifest["entries"].values()
    versions: dict[str, int] = {}
    unknown = 0
    for e in entries:
        code = e.get("code") or {}
        if not code.get("flipfrag"):
            unknown += 1
            continue
        label = f"`{(code.get('commit') or 'no git')[:7]}`" + (" with uncommitted changes" if code.get("dirty") else "")
        versions[label] = versions.get(label, 0) + 1
    parts = [f"{n} at code {v}" for v, n in sorted(versions.items(), key=lambda kv: -kv[1])]
    if unknown:
        parts.append(f"{unknown} with no code version recorded (made before the MANIFEST recorded provenance)")
    text = f"Figures and tables: {'; '.join(parts)}." if parts else ""
    use: dict[str, dict[str, Any]] = {}
    for info in manifest["notebooks"].values():
        for kind, u in (info.get("cache") or {}).items():
            tot = use.setdefault(kind, {"cached": 0, "computed": 0, "code": set()})
            tot["cached"] += u["cached"]
            tot["computed"] += u["computed"]
            tot["code"].update(u.get("code", []))
    if use:
        text += " Cached work units used by the notebooks: " + "; ".join(
            f"{kind}: {u['cached']} from the cache, {u['computed']} computed (code {', '.join(sorted(u['code']))})"
            for kind, u in sorted(use.items())) + "."  # fmt: skip
    return (text + " `make check-figures` lists the figures whose code changed after they were made.").strip()


#: The README's generated blocks (``flipfrag/readme.py`` writes all but ``claims`` and ``runtimes``).
README_BLOCKS = ("claims", "runtimes", "tests", "speed", "cost", "beyond")


def _readme_block(name: str, folder: str | Path | None) -> str:
    from . import readme

    if name == "runtimes":
        return render_runtimes(folder)
    if name == "tests":
        return readme.render_tests()
    if name == "speed":
        return readme.render_speed()
    if name == "cost":
        return readme.render_cost()
    if name == "beyond":
        return readme.render_beyond(figures_dir(folder))
    store = read_claims(folder)
    claims = store["claims"]
    lines = ["Generated from `figures/claims.json` by `python -m flipfrag.report --readme` (also run by",
             "`make figures`); verdicts follow the [written rules](docs/papers/README.md#verdict-rules), details and",
             "deviations in [`figures/REPRODUCTION.md`](figures/REPRODUCTION.md).", ""]  # fmt: skip
    for paper in sorted({cid.split("/")[0] for cid in claims}):
        lines += [f"**{paper}** — {_verdict_counts(claims, paper)}.", "", *render_claims_table(claims, paper), ""]
    return "\n".join(lines).rstrip("\n")


def readme_blocks(readme: str | Path) -> dict[str, str]:
    """The generated blocks of a README (between ``<!-- name:begin -->`` and ``<!-- name:end -->``)."""
    text = Path(readme).read_text()
    out = {}
    for name in README_BLOCKS:
        m = re.search(rf"<!-- {name}:begin -->\n(.*?)\n?<!-- {name}:end -->", text, re.S)
        if not m:
            raise ValueError(f"{readme}: no generated block <!-- {name}:begin --> ... <!-- {name}:end -->")
        out[name] = m.group(1).rstrip("\n")
    return out


def render_readme(readme: str | Path | None = None, folder: str | Path | None = None) -> str:
    """README.md's text with every generated block (:data:`README_BLOCKS`) rewritten from its source files."""
    readme = Path(readme) if readme is not None else Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    readme_blocks(readme)  # every block present
    for name in README_BLOCKS:
        body = _readme_block(name, folder)
        begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
        head, rest = text.split(begin, 1)
        text = head + begin + body + "\n" + end + rest.split(end, 1)[1]
    return text


def update_readme(readme: str | Path | None = None, folder: str | Path | None = None) -> Path:
    """Rewrite README.md's generated blocks (claims, runtimes, tests, speed, cost, beyond) from their sources."""
    readme = Path(readme) if readme is not None else Path(__file__).resolve().parent.parent / "README.md"
    text = render_readme(readme, folder)
    return atomic_write(readme, lambda tmp: tmp.write_text(text))


def write_reproduction(folder: str | Path | None = None) -> Path:
    folder = figures_dir(folder)
    text = render_reproduction(folder)
    return atomic_write(folder / "REPRODUCTION.md", lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write REPRODUCTION.md from claims.json and MANIFEST.json")
    parser.add_argument("--figures-dir", default=None)
    parser.add_argument("--readme", action="store_true", help="also rewrite README.md's generated blocks")
    args = parser.parse_args(argv)
    path = write_reproduction(args.figures_dir)
    print(f"wrote {path} ({_dt.datetime.now():%H:%M:%S})")
    if args.readme:
        print(f"wrote {update_readme(folder=args.figures_dir)}")


if __name__ == "__main__":
    main()
