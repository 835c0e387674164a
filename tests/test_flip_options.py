"""FlipOptions: checked once when made (errors name the field), keywords of closest_flip_point are overrides of it,
and the image rule lives in one place."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flipfrag.flip import FlipOptions, GradientOptions, closest_flip_point

F64 = torch.float64


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        (dict(tol=0), "tol"),
        (dict(kkt_tol=-1.0), "kkt_tol"),
        (dict(margin=math.inf), "margin"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_ineq=True), "max_ineq"),
        (dict(restarts=-1), "restarts"),
        (dict(homotopy=True, homotopy_tau=5.0), "homotopy_tau"),
        (dict(batch_size=0), "batch_size"),
        (dict(solve_dtype=torch.float16), "solve_dtype"),
        (dict(screen=0), "screen"),
        (dict(walk_steps=-1), "walk_steps"),
        (dict(walk_steps="many"), "walk_steps"),
        (dict(walk_steps=True), "walk_steps"),
    ],
)
def test_bad_options_are_named_when_made(kw, name):
    with pytest.raises(ValueError, match=name):
        FlipOptions(**kw)


def test_replace_validates_and_names_unknown_fields():
    base = FlipOptions(tol=1e-5)
    assert base.replace(max_iter=7) == FlipOptions(tol=1e-5, max_iter=7)
    assert base.replace() is base
    with pytest.raises(TypeError, match="tolerance"):
        base.replace(tolerance=1.0)
    with pytest.raises(TypeError, match="differentiable"):
        base.replace(differentiable="yes")
    with pytest.raises(dataclasses_frozen_error()):
        base.tol = 1.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_image_rule_and_resolved_defaults():
    assert FlipOptions.for_images().max_ineq == 2 and FlipOptions.for_images(max_ineq=4).max_ineq == 4
    smooth, relu = FlipOptions().resolved(nonsmooth=False), FlipOptions().resolved(nonsmooth=True)
    assert (smooth.max_iter, smooth.screen, smooth.nonsmooth, smooth.walk_steps) == (200, 3, False, 0)
    assert (relu.max_iter, relu.screen, relu.nonsmooth, relu.walk_steps) == (20, 1, True, 100)
    assert FlipOptions(walk_steps=7).resolved(nonsmooth=False).walk_steps == 7
    assert FlipOptions(max_iter=5, screen=None).resolved(nonsmooth=True).max_iter == 5
    assert FlipOptions(tol=1e-5, restarts=2).changed() == {"tol": 1e-5, "restarts": 2}


def test_options_and_keywords_give_the_same_solve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x = torch.rand(5, 4, dtype=F64)
    a = closest_flip_point(model, x, lower=0.0, upper=1.0, max_iter=30, restarts=1)
    b = closest_flip_point(model, x, lower=0.0, upper=1.0, options=FlipOptions(max_iter=30, restarts=1))
    c = closest_flip_point(model, x, lower=0.0, upper=1.0, options=FlipOptions(max_iter=99), max_iter=30, restarts=1)
    for r in (b, c):
        assert torch.equal(a.x_attempt, r.x_attempt) and torch.equal(a.converged, r.converged)
    with pytest.raises(TypeError, match="options"):
        closest_flip_point(model, x, options={"tol": 1e-5})
    with pytest.raises(TypeError, match="tolerance"):
        closest_flip_point(model, x, tolerance=1e-5)


def test_gradient_options_are_named():
    for kw, name in ((dict(dense_max=-1), "dense_max"), (dict(hess_tol=0), "hess_tol"), (dict(rank_tol=-1), "rank")):
        with pytest.raises(ValueError, match=name):
            GradientOptions(**kw)
