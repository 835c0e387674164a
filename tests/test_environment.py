"""environment.yml (Binder) must carry pyproject.toml's exact torch/torchvision pins; notebooks must be clean."""

import json
import re
import tomllib

import pytest
import yaml

from flipfrag.runner import find_notebooks


def _pins(repo):
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1): m.group(2) for d in deps if (m := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", d))}


def test_torch_pins_are_exact_and_a_matching_pair(repo):
    pins = _pins(repo)
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"


def test_environment_yml_matches_pyproject(repo):
    env = yaml.safe_load((repo / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = {}
    pip_part = None
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip_part = dep["pip"]
            continue
        name, _, rest = dep.partition("=")
        conda[name] = rest
    assert conda["python"] == "3.11" and "pip" in conda
    pins = _pins(repo)
    # conda-forge names torch "pytorch"; build strings select the CPU builds
    torch_version, torch_build = conda["pytorch"].split("=")
    tv_version, tv_build = conda["torchvision"].split("=")
    assert torch_version == pins["torch"], "environment.yml pytorch version drifted from pyproject.toml"
    assert tv_version == pins["torchvision"], "environment.yml torchvision version drifted from pyproject.toml"
    assert torch_build.startswith("cpu") and tv_build.startswith("cpu")
    assert pip_part and any(p.startswith("-e .") or p.startswith(".") for p in pip_part), "pip part installs flipfrag"


def test_installed_torch_is_the_pinned_pair(repo):
    import torch
    import torchvision

    pins = _pins(repo)
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


@pytest.mark.parametrize("path", find_notebooks(), ids=lambda p: p.name)
def test_notebooks_are_clean(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one parameters-tagged cell"
    params = "".join(tagged[0]["source"])
    for name in ("profile", "seed", "figures_dir"):
        assert re.search(rf"^{name}\s*=", params, re.M), f"parameters cell sets {name}"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs stripped"
    for c in code:  # algorithms live in flipfrag, not in notebooks
        assert not re.search(r"^\s*(def|class)\s", "".join(c["source"]), re.M), "no def/class inside a notebook"
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown"
