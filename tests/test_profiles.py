import pytest

from flipfrag.profiles import PROFILES, get_profile


def test_all_profiles_have_the_same_keys():
    keys = {name: set(p) for name, p in PROFILES.items()}
    assert keys["smoke"] == keys["quick"] == keys["paper"]


def test_sizes_grow_from_smoke_to_paper():
    s, q, p = (get_profile(n) for n in ("smoke", "quick", "paper"))
    for key in ("flip_n_points", "attack_iters", "attack_n_images", "mlp_epochs", "influence_n_test"):
        assert s[key] <= q[key] <= p[key], key
    assert p["attack_iters"] == 300 and p["ig_steps"] == 100 and p["k_top"] == 1000  # Ghorbani et al.'s code defaults
    assert s["offline"] and q["offline"] and not p["offline"]


def test_get_profile_returns_a_copy_and_checks_names():
    a = get_profile("quick")
    a["epsilons"].append(99)
    assert 99 not in get_profile("quick")["epsilons"]
    with pytest.raises(ValueError, match="profile"):
        get_profile("fast")
    with pytest.raises(ValueError, match="unknown profile keys"):
        get_profile("smoke", not_a_key=1)
    assert get_profile("smoke", attack_iters=7)["attack_iters"] == 7
