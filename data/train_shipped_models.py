"""Retrain the quick-profile models shipped in data/models/ from scratch and compare them with the shipped ones.

``make models`` (= ``python data/train_shipped_models.py``) trains every model the ``quick`` profile's notebooks
train (through the same flipfrag functions the notebooks call, so the configuration keys are the same) in a fresh
temporary cache with the shipped weights switched off, then prints, per model, how far the retrained one lands from
the shipped one: test accuracy, the largest logit difference on its evaluation set and the largest weight
difference. ``--write`` (``make models WRITE=1``) replaces the shipped files, ``data/models/INDEX.json`` and the
``models/`` lines of ``data/SHA256SUMS`` with the retrained ones. Exit code 1 if a shipped model is missing from
the retrained set or vice versa (the list of models changed: ship them with ``--write``).

Training runs under ``flipfrag.models.deterministic_training`` (1 thread, deterministic algorithms); expect the
same bits on the same CPU type and small differences elsewhere (see data/README.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _evaluation_sets(prof: dict, seed: int) -> dict:
    """Run the notebooks' model builders; return {model name: (X_eval, y_eval)} for the models they train."""
    from flipfrag import datasets, flippoints, fragility, models

    evals = {}
    for key in models.ZOO:  # 00_data_overview, flip_points/*: the zoo's erf MLPs and the MNIST CNN
        _, data, _ = models.trained_model(key, prof, seed=seed, progress=False)
        evals[key] = (data.X_test, data.y_test)
    for key in ("adult-erf", "breast_cancer-erf"):  # flip_points/01, 02, 04: tanh and softplus variants
        for act in ("tanh", "softplus"):
            _, data, _ = flippoints.trained_variant(key, act, prof, seed=seed)
            evals[f"{models.ZOO[key]['dataset']}-{act}"] = (data.X_test, data.y_test)
    # fragility/07 (input-dimension comparison): the MNIST CNNs at 28x28 (as the fragility package loads MNIST-5k)
    # and average-pooled to 14x14; the ImageNet / CIFAR roles use the pretrained models/cifar10_cnn.pt (not trained)
    fragility.image_setting("mnist28", prof, seed=seed, n=1)
    fragility.image_setting("mnist14", prof, seed=seed, n=1)
    mnist = datasets.load_mnist(prof["mnist_n"], offline=True, seed=seed)
    evals["mnist14-cnn"] = (fragility.downsample(mnist.X_test, 2), mnist.y_test)
    # fragility/06: the influence experiment's feature CNN, trained on the eight other digits
    setting = fragility.influence_setting(prof, seed=seed)
    del setting
    full = datasets.load_mnist(None, offline=True, seed=seed)
    classes = (3, 8)
    others = [c for c in range(10) if c not in classes]
    keep = (full.y_test != classes[0]) & (full.y_test != classes[1])
    import torch

    remap = torch.full((10,), -1, dtype=torch.long)
    remap[others] = torch.arange(len(others))
    evals[f"mnist-without-{classes[0]}{classes[1]}-cnn"] = (full.X_test[keep], remap[full.y_test[keep]])
    return evals


def _reference(model, X, y) -> dict:
    from flipfrag import models

    logits = models.predict(model, X)
    return {
        "n_eval": int(len(y)),
        "eval_acc": float((logits.argmax(1) == y).float().mean()),
        "logits_head": [[round(float(v), 6) for v in row] for row in logits[:3]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the shipped weights with the retrained ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=str(HERE), help="the data folder (default: this script's folder)")
    args = parser.parse_args(argv)

    os.environ["FLIPFRAG_SHIPPED_MODELS"] = "0"  # train everything from scratch ...
    tmp = tempfile.mkdtemp(prefix="flipfrag-models-")
    os.environ["FLIPFRAG_CACHE"] = tmp  # ... in an empty cache
    sys.path.insert(0, str(HERE.parent))

    from flipfrag import models
    from flipfrag.profiles import get_profile

    prof = get_profile("quick")
    start = time.perf_counter()
    try:
        with models.record_training() as log:
            evals = _evaluation_sets(prof, args.seed)
        return _report(args, models, log, evals, start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report(args, models, log, evals, start) -> int:
    import torch

    trained = {}
    for rec in log:
        if rec["how"] != "trained":
            continue
        if rec["name"] not in evals:
            print(f"ERROR: {rec['name']} was trained but has no evaluation set in this script", file=sys.stderr)
            return 1
        trained[f"{rec['name']}-{rec['key']}.pt"] = rec
    print(f"retrained {len(trained)} models in {time.perf_counter() - start:.0f} s "
          f"({torch.__version__}, {models.deterministic_training.__name__}: 1 thread)")  # fmt: skip

    os.environ["FLIPFRAG_SHIPPED_MODELS"] = "1"
    index = models.shipped_index(args.data_dir)
    status, rows, retrained = 0, [], {}
    for fname, rec in sorted(trained.items()):
        model, meta = models.load_checkpoint(rec["path"], key=rec["key"])
        X, y = evals[rec["name"]]
        ref = _reference(model, X, y)
        retrained[fname] = (model, meta, ref)
        if fname not in index:
            rows.append((fname, f"not shipped -> {ref['eval_acc']:.4f}", "", "", ""))
            status = 1
            continue
        shipped_ref = index[fname]["reference"]
        old, _ = models._load_payload(
            models.shipped_checkpoint(rec["name"], rec["key"], root=args.data_dir), rec["key"]
        )
        dlogit = float((models.predict(old, X) - models.predict(model, X)).abs().max())
        dweight = max(float((a - b).abs().max()) for a, b in zip(old.state_dict().values(),
                                                                 model.state_dict().values()))  # fmt: skip
        dacc = ref["eval_acc"] - shipped_ref["eval_acc"]
        rows.append((fname, f"{shipped_ref['eval_acc']:.4f} -> {ref['eval_acc']:.4f}", f"{dacc:+.4f}", f"{dlogit:.3g}",
                     f"{dweight:.3g}"))  # fmt: skip
    for fname in sorted(set(index) - set(trained)):
        rows.append((fname, "shipped, but the quick profile no longer trains it", "", "", ""))
        status = 1
    print(f"\n{'shipped file':42s} {'test acc shipped -> retrained':30s} {'diff':>8s} {'max|dlogit|':>12s} "
          f"{'max|dweight|':>12s}")  # fmt: skip
    for r in rows:
        print(f"{r[0]:42s} {r[1]:30s} {r[2]:>8s} {r[3]:>12s} {r[4]:>12s}")
    if args.write:  # start from an empty index: files no longer trained disappear with their SHA256SUMS lines
        from flipfrag._io import atomic_write_json

        for fname in index:
            (Path(args.data_dir) / "models" / fname).unlink(missing_ok=True)
        atomic_write_json(Path(args.data_dir) / models.SHIPPED_INDEX, {"models": {}})
        sums = Path(args.data_dir) / "SHA256SUMS"  # the emptied index has no sha256 yet: drop the models/ lines
        sums.write_text("".join(ln + "\n" for ln in sums.read_text().splitlines() if ln and "  models/" not in ln))
        for fname, (model, meta, ref) in retrained.items():
            parts = trained[fname]["parts"]
            models.ship_model(model, parts, meta={**meta, "epochs": parts["train"].get("epochs")}, reference=ref,
                              root=args.data_dir)  # fmt: skip
        total = sum((Path(args.data_dir) / "models" / f).stat().st_size for f in retrained)
        print(f"\nwrote {len(retrained)} models to {Path(args.data_dir) / 'models'} ({total / 1e6:.2f} MB), "
              "INDEX.json and SHA256SUMS")  # fmt: skip
        status = 0
    return status


if __name__ == "__main__":
    sys.exit(main())
