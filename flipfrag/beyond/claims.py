"""The REPRODUCTION.md rows of the beyond studies (section ``beyond``): built from the tables, recorded by the
notebooks with :func:`flipfrag.report.record_claim`. Neither paper measured these, so most rows are *measured
only*; the curvature row tests paper 2's Hessian argument as a qualitative claim with its conditions stated."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .flipmap import FLIP_METHOD

_NAN = float("nan")

__all__ = ["boundary_claims", "flip_claims", "SHORT"]

SHORT = {"gradient": "SG", "integrated_gradients": "IG", "deeplift": "DeepLIFT", "dtd": "DTD", FLIP_METHOD: "flip"}


def _rho_text(row: pd.Series) -> str:
    if not np.isfinite(row.rho):
        return f"{SHORT[row.method]} n/a (n = {row.n})"
    return f"{SHORT[row.method]} {row.rho:+.2f} [{row.low:+.2f}, {row.high:+.2f}] ({row.relation})"


def _pair_text(corr: pd.DataFrame, model: str, xq: str, yq: str) -> str:
    g = corr[(corr.model == model) & (corr.x == xq) & (corr.y == yq)]
    n = int(g.n.max()) if len(g) else 0
    if not np.isfinite(g.rho).any():
        return f"{model}: n/a (n = {n})"
    if (xq, yq) == ("distance", "curvature"):  # the same for every method
        r = g.iloc[0]
        return f"{model} (n = {n}): {r.rho:+.2f} [{r.low:+.2f}, {r.high:+.2f}] ({r.relation})"
    return f"{model} (n = {n}): " + "; ".join(_rho_text(r) for _, r in g.iterrows())


def boundary_claims(corr: pd.DataFrame, flips: Mapping[str, Mapping[str, Any]], *, deviation: str,
                    n_boot: int) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of study 1 from :func:`flipfrag.beyond.boundary_correlations` and, per model, ``flips[model]`` =
    ``{"n_solved", "n_certified", "seconds"}`` of its flip-point solve."""
    models = list(dict.fromkeys(corr.model))
    ci = f"Spearman ρ across images, 95 % percentile bootstrap interval ({n_boot} resamples, seeded)"
    rows = [
        dict(
            claim_id="beyond/boundary_fragility_corr",
            claim=("Images nearer the decision boundary have more fragile saliency maps: ρ(distance to the closest "
                   "certified flip point, top-k ∩ after the top-k attack at ε = 8/255) > 0"),
            kind="measured",
            ours=" | ".join(_pair_text(corr, m, "distance", "topk_attack") for m in models),
            note=("relation = positive / negative when the interval excludes 0, else none found; random sign: "
                  + " | ".join(_pair_text(corr, m, "distance", "topk_random") for m in models)),
            deviation=deviation + f"; {ci}",
            source="neither paper (beyond: paper 1's distance x paper 2's fragility)",
        )
    ]  # fmt: skip
    conditions = {}
    for m in models:
        g = corr[(corr.model == m) & (corr.x == "curvature") & (corr.y == "topk_attack") & (corr.method == "gradient")]
        if len(g):  # no ρ (e.g. the attack left every ∩ at 1: no variation) cannot confirm the prediction
            r = g.iloc[0]
            conditions[f"{m}, simple gradient: ρ(|λ_max|, top-k ∩ after the top-k attack) < 0, interval below 0"] = (
                bool(np.isfinite(r.rho) and np.isfinite(r.high) and r.high < 0)
            )
    if conditions:
        rows.append(dict(
            claim_id="beyond/boundary_curvature_mediator",
            claim=("Across images, larger input-Hessian curvature |λ_max| goes with more fragile maps (the Hessian "
                   "argument as a per-image prediction)"),
            kind="qualitative",
            paper_value="paper 2 (geometry section): fragility comes from the curvature of the network",
            ours=" | ".join(_pair_text(corr, m, "curvature", "topk_attack") for m in models),
            conditions=conditions,
            note="distance vs curvature: " + " | ".join(_pair_text(corr, m, "distance", "curvature") for m in models),
            deviation=deviation + f"; {ci}; curvature of the class logit (softplus surrogate for the ReLU CNN)",
            source="docs/papers/fragility.md §6 (the Hessian argument; per-image form is ours)",
        ))  # fmt: skip
    cert = "; ".join(f"{m}: {v['n_certified']} of {v['n_solved']} certified ({v['seconds']:.0f} s of solving)"
                     for m, v in flips.items())  # fmt: skip
    rows.append(dict(
        claim_id="beyond/flip_points_certified",
        claim="Closest flip points certified within the notebook's budget (uncertified ones excluded, never replaced)",
        kind="measured",
        ours=cert,
        deviation=deviation,
        source="flipfrag.flip certificate (residual, margin, bounds, KKT)",
    ))  # fmt: skip
    return rows


#: The flip explanation's rows, in table order (``surrogate-*``: a ReLU network's own attacks with the direction
#: from a smooth surrogate's flip map, :func:`flipfrag.beyond.flip_fragility_rows` ``surrogate_beta``).
FLIP_ATTACKS = ("random", "topk", "center", "surrogate-topk", "surrogate-center", "transfer-topk", "transfer-center")


def _at(summary: pd.DataFrame, model: str, method: str, attack: str, eps255: float, metric: str) -> float:
    g = summary[(summary.model == model) & (summary.method == method) & (summary.attack == attack)
                & np.isclose(summary.eps255, eps255)]  # fmt: skip
    return float(g.iloc[0][metric]) if len(g) and bool(g.iloc[0].available) else float("nan")


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.2f}"


def flip_claims(summary: pd.DataFrame, info: Mapping[str, Mapping[str, Any]], *, deviation: str,
                eps255: float = 8.0, flip_attacks: Sequence[str] = FLIP_ATTACKS,
                rows: pd.DataFrame | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of study 2 from :func:`flipfrag.beyond.summarize_flip_fragility` at ``eps255``; ``info[model]`` is the
    info dict of :func:`flipfrag.beyond.flip_fragility_rows`. With the per-image ``rows`` (its first return value)
    the surrogate-direction row compares with the random sign and transfer on the attacked images only."""
    parts, survive = [], []
    for model, inf in info.items():
        if inf["n_certified"] == 0:
            parts.append(f"{model}: no image with a certified flip point (0 of {inf['n_images']}), not available")
            survive.append(f"{model}: not available")
            continue
        present = set(summary[(summary.model == model) & (summary.method == FLIP_METHOD)].attack)
        attacks = [a for a in flip_attacks if a in present]  # the rows this network has
        fl = ", ".join(
            f"{a} {_fmt(_at(summary, model, FLIP_METHOD, a, eps255, 'topk'))}/"
            f"{_fmt(_at(summary, model, FLIP_METHOD, a, eps255, 'spearman'))}"
            for a in attacks
        )
        sal = ", ".join(
            f"{SHORT[m]} {_fmt(_at(summary, model, m, 'topk', eps255, 'topk'))}/"
            f"{_fmt(_at(summary, model, m, 'topk', eps255, 'spearman'))}"
            for m in dict.fromkeys(summary[summary.model == model].method)
            if m != FLIP_METHOD
        )
        whose = f"the β = {inf['surrogate_beta']:g} surrogate's x_flip" if inf.get("surrogate_beta") else "x_flip"
        deriv = f"{whose} differentiable at {inf.get('n_derivative', 0)} of {inf['n_certified']}"
        parts.append(f"{model} (n = {inf['n_certified']}; {deriv}): flip map {fl}; saliency maps, top-k attack: {sal}")
        survive.append(
            f"{model}: "
            + ", ".join(f"{a} {_fmt(_at(summary, model, FLIP_METHOD, a, eps255, 'target_kept'))}" for a in attacks)
        )
    not_avail = [m for m, inf in info.items() if not inf.get("differentiable", False)]
    note = (
        "top-k ∩ / Spearman ρ against the unperturbed map, mean over images; own top-k / center attacks "
        "differentiate through closest_flip_point(differentiable=True)"
    )
    if not_avail:
        note += "; that solver is not available in this build, so those rows are n/a"
    out = [
        dict(claim_id="beyond/flip_explanation_fragility",
             claim=(f"The flip-point explanation |x_flip − x| under paper 2's attacks at ε = {eps255:g}/255, next to "
                    "the saliency maps on the same images"),
             kind="measured", ours=" | ".join(parts), note=note, deviation=deviation,
             source="neither paper (beyond: paper 1's explanation x paper 2's attacks)"),
        dict(claim_id="beyond/flip_target_survival",
             claim=(f"Fraction of images whose closest flip point keeps its target class after the attack "
                    f"(ε = {eps255:g}/255)"),
             kind="measured", ours=" | ".join(survive), deviation=deviation,
             note="an image whose perturbed flip point is not certified counts as not kept",
             source="neither paper"),
    ]  # fmt: skip
    surrogate = {m: inf for m, inf in info.items() if inf.get("surrogate_beta")}
    if surrogate:
        out.append(_surrogate_claim(summary, surrogate, deviation=deviation, eps255=eps255, rows=rows))
    return out


def _mean_on(rows: pd.DataFrame, model: str, attack: str, eps255: float, images: set, metric: str) -> float:
    g = rows[(rows.model == model) & (rows.method == FLIP_METHOD) & (rows.attack == attack)
             & np.isclose(rows.eps255, eps255) & rows.image.isin(images) & rows.available.astype(bool)]  # fmt: skip
    v = g[metric].to_numpy(float)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _surrogate_claim(summary: pd.DataFrame, info: Mapping[str, Mapping[str, Any]], *, deviation: str,
                     eps255: float, rows: pd.DataFrame | None) -> dict[str, Any]:  # fmt: skip
    """The row of the ReLU networks' flip-map attacks with the smooth surrogate's direction: their top-k ∩ /
    Spearman ρ next to the random sign and the SG attack's transfer (on the same images when ``rows`` is given),
    and whether the surrogate direction moves the ReLU model's flip map more than the random sign does."""
    parts = []
    for model, inf in info.items():
        n_att = int(inf.get("n_differentiated", 0))
        if inf["n_certified"] == 0 or n_att == 0:
            why = ("no image with a certified flip point" if inf["n_certified"] == 0 else
                   f"no certified surrogate flip point with a derivative ({inf.get('n_derivative', 0)} of "
                   f"{inf['n_certified']})")  # fmt: skip
            parts.append(f"{model}: not available ({why})")
            continue
        have = set(summary[(summary.model == model) & (summary.method == FLIP_METHOD)].attack)
        names = [a for a in ("surrogate-topk", "surrogate-center", "random", "transfer-topk") if a in have]
        own = [a for a in names if a.startswith("surrogate-")]
        if rows is not None:  # the attacked images: those with a value in a surrogate-direction row
            g = rows[(rows.model == model) & rows.attack.isin(own) & np.isclose(rows.eps255, eps255)]
            imgs = set(g[g.available.astype(bool) & g.topk.notna()].image)
            val = {a: tuple(_mean_on(rows, model, a, eps255, imgs, m) for m in ("topk", "spearman")) for a in names}
        else:
            val = {a: (_at(summary, model, FLIP_METHOD, a, eps255, "topk"),
                       _at(summary, model, FLIP_METHOD, a, eps255, "spearman")) for a in names}  # fmt: skip
        rnd = val.get("random", (_NAN, _NAN))[0]
        effects = []
        for a in own:
            st = val[a][0]
            if np.isfinite(st) and np.isfinite(rnd):
                effects.append(f"{a}: " + ("lowers ∩ below the random sign's" if st < rnd - 0.02 else
                                           "no effect beyond the random sign's (∩ within 0.02 or above)"))  # fmt: skip
            else:
                effects.append(f"{a}: no comparison (a row has no value)")
        effect = "; ".join(effects) if effects else "no surrogate-direction row ran"
        parts.append(
            f"{model} (β = {inf['surrogate_beta']:g}; {n_att} of {inf['n_certified']} certified images attacked): "
            + ", ".join(f"{a} {_fmt(t)}/{_fmt(r)}" for a, (t, r) in val.items())
            + f"; {effect}"
        )
    return dict(
        claim_id="beyond/flip_relu_surrogate_direction",
        claim=(f"ReLU CNN: the flip-point explanation under its own top-k (and center) attacks whose direction "
               f"differentiates a smooth surrogate's flip map (softplus + log-sum-exp pooling), measured on the ReLU "
               f"model at ε = {eps255:g}/255"),
        kind="measured", ours=" | ".join(parts),
        note=("top-k ∩ / Spearman ρ against the ReLU model's unperturbed flip map, mean over the attacked images "
              + ("(random sign and transfer on the same images)" if rows is not None else
                 "(random sign and transfer: over every certified image)")
              + "; the surrogate's flip point is solved toward the target class of the ReLU model's; the map, label "
              "check and best iterate are the ReLU model's"),
        deviation=deviation,
        source="neither paper (beyond: paper 1's explanation x paper 2's surrogate attacks)",
    )  # fmt: skip
