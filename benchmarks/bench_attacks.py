"""Batched attacks vs one image at a time, and flipfrag's integrated gradients vs Captum's.

Measured in one process, as ratios:

1. A 100-iteration top-k attack (simple gradient, then integrated gradients) on a batch of images, against the same
   attack object called on one image at a time (what a per-image attack loop, e.g. one Captum call per image, does).
   Reported: images per second both ways and the throughput ratio (goal: >= 10x).
2. Integrated-gradients attributions (right Riemann sum, 100 steps, zero baseline, all interpolants in one pass)
   from ``flipfrag.saliency.integrated_gradients`` against Captum's ``IntegratedGradients(method="riemann_right")``
   on the same model and inputs: time ratio (goal: not slower) and the largest absolute difference (goal: equal).

The model is ``flipfrag.models.SmallCNN`` (ReLU, max-pooling, GAP head) with random weights: timing does not depend
on training, and the attacks take the model's own predictions as labels. Run::

    python benchmarks/bench_attacks.py            # the sizes in DEFAULTS (a few minutes on 2 CPU cores)
    python benchmarks/bench_attacks.py --smoke    # seconds, to check that the script runs

Writes ``benchmarks/results/bench_attacks.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from flipfrag._io import atomic_write
from flipfrag.attacks import TopKAttack
from flipfrag.models import SmallCNN
from flipfrag.saliency import integrated_gradients

RESULTS = Path(__file__).resolve().parent / "results"

DEFAULTS = {
    # MNIST-size images as in the quick profile, and CIFAR-size ones
    "configs": [
        {"name": "mnist28", "channels": 1, "size": 28, "width": 16},
        {"name": "cifar32", "channels": 3, "size": 32, "width": 16},
    ],
    "iters": 100,
    "batch_gradient": 32,
    "batch_ig": 8,
    "ig_steps_attack": 20,
    "ig_batch_captum": 16,
    "ig_steps_captum": 100,
    "repeats_captum": 3,
}
SMOKE = {
    "configs": [{"name": "tiny16", "channels": 1, "size": 16, "width": 4}],
    "iters": 5,
    "batch_gradient": 4,
    "batch_ig": 2,
    "ig_steps_attack": 4,
    "ig_batch_captum": 4,
    "ig_steps_captum": 10,
    "repeats_captum": 1,
}


def _model(cfg: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN(cfg["channels"], 10, width=cfg["width"]).eval()


def _images(cfg: dict, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    # smooth random images (low-resolution noise upsampled), closer to natural images than white noise
    low = torch.rand(n, cfg["channels"], cfg["size"] // 4, cfg["size"] // 4, generator=gen)
    return torch.nn.functional.interpolate(low, size=cfg["size"], mode="bilinear", align_corners=False).clamp(0, 1)


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_batched_attack(cfg: dict, method: str, n: int, iters: int, ig_steps: int) -> dict:
    model = _model(cfg)
    x = _images(cfg, n)
    kwargs = {"method_kwargs": {"steps": ig_steps}} if method == "ig" else {}
    attack = TopKAttack(model, method, k=None, iters=iters, progress=False, **kwargs)
    attack(x[:1])  # warm-up (allocator, first-call overheads)
    t_batch = _time(lambda: attack(x))
    t_single = _time(lambda: [attack(x[i : i + 1]) for i in range(n)])
    return {
        "config": cfg["name"],
        "method": method,
        "images": n,
        "iters": iters,
        "ig_steps": ig_steps if method == "ig" else None,
        "batched_s": t_batch,
        "one_at_a_time_s": t_single,
        "batched_images_per_s": n / t_batch,
        "one_at_a_time_images_per_s": n / t_single,
        "throughput_ratio": t_single / t_batch,
    }


def bench_ig_vs_captum(cfg: dict, n: int, steps: int, repeats: int) -> dict:
    from captum.attr import IntegratedGradients

    model = _model(cfg)
    x = _images(cfg, n)
    y = model(x).argmax(1)
    ours = integrated_gradients(model, x, y, steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = IntegratedGradients(model)
        theirs = captum.attribute(x, target=y, n_steps=steps, method="riemann_right").detach()
        t_ours = [_time(lambda: integrated_gradients(model, x, y, steps=steps)) for _ in range(repeats)]
        t_captum = [
            _time(lambda: captum.attribute(x, target=y, n_steps=steps, method="riemann_right")) for _ in range(repeats)
        ]
    scale = float(theirs.abs().max())
    return {
        "config": cfg["name"],
        "images": n,
        "steps": steps,
        "flipfrag_s": statistics.median(t_ours),
        "captum_s": statistics.median(t_captum),
        "speed_ratio_captum_over_flipfrag": statistics.median(t_captum) / statistics.median(t_ours),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_abs_attr": scale,
    }


def _markdown(res: dict) -> str:
    lines = [
        "# bench_attacks",
        "",
        f"Machine: {res['machine']}; torch {res['torch']}; threads {res['threads']}.",
        "",
        "## Batched top-k attack vs one image at a time",
        "",
        "| images | method | n | iters | IG steps | batched img/s | one-at-a-time img/s | throughput ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["attack"]:
        lines.append(
            f"| {r['config']} | {r['method']} | {r['images']} | {r['iters']} | {r['ig_steps'] or '-'} | "
            f"{r['batched_images_per_s']:.2f} | {r['one_at_a_time_images_per_s']:.2f} | {r['throughput_ratio']:.2f}x |"
        )
    lines += [
        "",
        "Goal: >= 10x. See the notes below for why a CPU falls short of it.",
        "",
        "## Integrated gradients: flipfrag vs Captum (riemann_right, zero baseline, one pass)",
        "",
        "| images | n | steps | flipfrag s | Captum s | Captum time / flipfrag time | max abs diff | max abs attr |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ig_vs_captum"]:
        lines.append(
            f"| {r['config']} | {r['images']} | {r['steps']} | {r['flipfrag_s']:.3f} | {r['captum_s']:.3f} | "
            f"{r['speed_ratio_captum_over_flipfrag']:.2f} | {r['max_abs_diff']:.2e} | {r['max_abs_attr']:.2e} |"
        )
    lines += ["", "Goal: ratio >= 1 (not slower), differences at float32 rounding.", "", "## Notes", ""]
    lines += [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for bench_attacks.json / .md")
    args = parser.parse_args(argv)
    p = SMOKE if args.smoke else DEFAULTS
    res: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "parameters": p,
        "attack": [],
        "ig_vs_captum": [],
    }
    for cfg in p["configs"]:
        for method, n in (("gradient", p["batch_gradient"]), ("ig", p["batch_ig"])):
            r = bench_batched_attack(cfg, method, n, p["iters"], p["ig_steps_attack"])
            print(
                f"attack {cfg['name']:8s} {method:8s} n={n:3d}: batched {r['batched_images_per_s']:.2f} img/s, "
                f"one at a time {r['one_at_a_time_images_per_s']:.2f} img/s, ratio {r['throughput_ratio']:.2f}x",
                flush=True,
            )
            res["attack"].append(r)
        r = bench_ig_vs_captum(cfg, p["ig_batch_captum"], p["ig_steps_captum"], p["repeats_captum"])
        print(
            f"IG     {cfg['name']:8s} n={r['images']} steps={r['steps']}: flipfrag {r['flipfrag_s']:.3f}s, "
            f"Captum {r['captum_s']:.3f}s (Captum/flipfrag {r['speed_ratio_captum_over_flipfrag']:.2f}), "
            f"max |diff| {r['max_abs_diff']:.1e}",
            flush=True,
        )
        res["ig_vs_captum"].append(r)
    res["notes"] = [
        "On a CPU the attack's cost is dominated by convolutions whose cost grows linearly with the batch, so "
        "batching removes only the per-call Python/dispatch overhead; the >= 10x goal is a GPU-scale expectation "
        "(where one image leaves the device idle). The ratio grows as images get smaller and models thinner.",
        "IG already evaluates its interpolants as one batch per image, so batching images adds little for IG.",
        "Captum's IG rounds its alphas to float32, hence differences near float32 rounding of the attributions.",
    ]
    name = "bench_attacks"
    if not args.smoke:
        for suffix, text in ((".json", json.dumps(res, indent=2) + "\n"), (".md", _markdown(res))):
            path = atomic_write(args.out / f"{name}{suffix}", lambda t, text=text: t.write_text(text))
            path.chmod(0o644)  # the temporary file behind atomic_write is private (0600)
        print(f"wrote {args.out / name}.json and .md")
    else:
        print(_markdown(res))
    return res


if __name__ == "__main__":
    main()
