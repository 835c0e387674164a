"""The README's quick-start code runs as written (with fewer iterations) on the shipped pretrained CIFAR-10 CNN."""

import re

import torch

from flipfrag import set_threads


def test_readme_quick_start_runs(repo):
    text = (repo / "README.md").read_text()
    block = re.search(r"## Quick start: your own model.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a quick-start code block"
    code = block.group(1)
    for long, short in (("iters=300", "iters=2"), ("max_iter=50", "max_iter=5"), ("set_threads(2)", "set_threads(1)")):
        assert long in code, long
        code = code.replace(long, short)
    before = torch.get_num_threads()
    ns: dict = {}
    try:
        exec(compile(code, "README.md quick start", "exec"), ns)
    finally:
        set_threads(before)
    res, out, x, y, model = ns["res"], ns["out"], ns["x"], ns["y"], ns["model"]
    assert res.x_flip.shape == x.shape and len(res.status) == 2
    # both photos certified even with the shortened budget (measured: 5 iterations suffice), so the checks below
    # never run on an empty selection
    assert res.converged.all(), res.status
    with torch.no_grad():  # recomputed here: the source and the runner-up tie at x_flip, and no class beats them
        z = model(res.x_flip)
    runner_up = ns["scores"].topk(2, 1).indices[:, 1]
    assert torch.equal(res.source, y) and torch.equal(res.target, runner_up)
    zs, zt = z.gather(1, y[:, None])[:, 0], z.gather(1, runner_up[:, None])[:, 0]
    torch.testing.assert_close(zs, zt, atol=1e-4, rtol=1e-5)
    assert (z.max(1).values <= torch.maximum(zs, zt) + 1e-4).all()
    dist = (res.x_flip - x).flatten(1).norm(dim=1).to(res.distance.dtype)
    torch.testing.assert_close(res.distance, dist, atol=1e-5, rtol=1e-5)
    assert res.x_flip.min() >= 0 and res.x_flip.max() <= 1
    # the attack: the label re-checked on the model here (not out.label_kept, which holds by construction), the
    # perturbation inside the budget and actually there (a failed attack returns x itself)
    with torch.no_grad():
        assert torch.equal(model(out.x_adv).argmax(1), y)
    assert out.success.all() and ((out.x_adv - x).flatten(1).abs().amax(1) > 0).all()
    assert (out.x_adv - x).abs().max() <= 8 / 255 + 1e-6 and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert ns["net"](x).shape == (2, 10)
