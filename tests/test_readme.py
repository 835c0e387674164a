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
    res, out, x = ns["res"], ns["out"], ns["x"]
    assert res.x_flip.shape == x.shape and len(res.status) == 2
    with torch.no_grad():  # wherever certified, the two scores really are equal at x_flip (recomputed here)
        z = ns["model"](res.x_flip[res.converged])
    src, tgt = res.source[res.converged], res.target[res.converged]
    assert torch.allclose(z.gather(1, src[:, None]), z.gather(1, tgt[:, None]), atol=1e-4, rtol=1e-5)
    assert out.label_kept.all() and (out.x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert ns["net"](x).shape == (2, 10)
