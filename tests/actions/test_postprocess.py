"""The action post-processing chain against the formulas as NORA's and LeRobot's code write them (float64).

References written here, independently of nora_edge.actions.postprocess:
- NORA q01/q99: declare-lab/nora ``inference/nora.py`` ``Nora.inference``:
  ``0.5 * (output_action + 1) * (action_high - action_low) + action_low`` (high = q99, low = q01, mask ignored).
- LeRobot: huggingface/lerobot ``lerobot/common/policies/normalize.py`` ``Unnormalize.forward``: MIN_MAX
  ``b = (b + 1) / 2; b = b * (max - min) + min``; MEAN_STD ``b * std + mean`` (no eps on unnormalize).
- NORA gripper helpers (``inference/nora.py``): ``normalize_gripper_action(action, binarize=True)`` and
  ``invert_gripper_action(action)``, re-typed below on the last dim as NORA writes them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nora_edge.actions.normalize import NormStats
from nora_edge.actions.postprocess import Chain, default_chain, gripper_step
from nora_edge.errors import BundleError, InputError

D = 7


def nora_normalize_gripper_action(action: np.ndarray, binarize: bool = True) -> np.ndarray:
    orig_low, orig_high = 0.0, 1.0
    action[..., -1] = 2 * (action[..., -1] - orig_low) / (orig_high - orig_low) - 1
    if binarize:
        action[..., -1] = np.sign(action[..., -1])
    return action


def nora_invert_gripper_action(action: np.ndarray) -> np.ndarray:
    action[..., -1] = action[..., -1] * -1.0
    return action


def lerobot_unnormalize_min_max(b: np.ndarray, mn: np.ndarray, mx: np.ndarray) -> np.ndarray:
    b = (b + 1) / 2
    return b * (mx - mn) + mn


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12)


@pytest.fixture
def stats(rng) -> NormStats:
    q01 = rng.uniform(-2.0, 0.0, D)
    return NormStats("robot_a", q01, q01 + rng.uniform(0.1, 3.0, D), mask=[True] * (D - 1) + [False])


def _x(rng, n: int = 40) -> np.ndarray:
    x = rng.uniform(-1.0, 1.0, (n, D))
    x[:4, -1] = [-1.0, 0.0, 1.0, -0.0]  # the binarize edge (sign(0) = 0) and the interval ends
    return x


def _min_max_json(rng, **extra) -> list[dict]:
    mn = rng.uniform(-3.0, 0.0, D)
    mx = mn + rng.uniform(0.5, 2.0, D)
    mn[-1], mx[-1] = 0.0, 1.0  # gripper recorded in [0, 1] (NORA pretraining convention)
    step = {"op": "unnormalize", "mode": "min_max", "min": mn.tolist(), "max": mx.tolist()}
    return [{**step, "source": "meta/stats.json[action]", **extra}]


def test_q01_q99_default_chain_matches_nora(rng, stats):
    x = _x(rng)
    chain = default_chain().validate(D, {stats.key: stats}, BundleError, "t")
    got = chain.apply(x, chain.stats_for({stats.key: stats}, None))
    q99, q01 = np.array(stats.q99.tolist()), np.array(stats.q01.tolist())
    want = 0.5 * (x + 1) * (q99 - q01) + q01  # mask present but ignored, as NORA does
    assert got.dtype == np.float64 and got.shape == want.shape == (40, D)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert not np.array_equal(got[:, -1], x[:, -1])  # the mask did not leave the gripper dim alone


def test_min_max_matches_lerobot(rng):
    x = _x(rng)
    chain = Chain.from_json(_min_max_json(rng), BundleError, "t").validate(D, {}, BundleError, "t")
    s = chain.unnormalize
    got = chain.apply(x, chain.stats_for({}, None))
    want = lerobot_unnormalize_min_max(x.copy(), np.array(s.params["min"]), np.array(s.params["max"]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert got.size == 40 * D


def test_mean_std_matches_lerobot(rng):
    x = rng.normal(size=(25, D))
    mean, std = rng.normal(size=D), rng.uniform(0.1, 2.0, D)
    d = [{"op": "unnormalize", "mode": "mean_std", "mean": mean.tolist(), "std": std.tolist(), "source": "s"}]
    chain = Chain.from_json(d, BundleError, "t").validate(D, {}, BundleError, "t")
    got = chain.apply(x)
    np.testing.assert_allclose(got, x * std + mean, rtol=0, atol=1e-14)
    assert got.size == 25 * D


def test_mask_leaves_dims_as_produced(rng):
    x = _x(rng)
    mask = [True, False, True, True, True, True, False]
    chain = Chain.from_json(_min_max_json(rng, mask=mask), BundleError, "t").validate(D, {}, BundleError, "t")
    s = chain.unnormalize
    got = chain.apply(x)
    full = lerobot_unnormalize_min_max(x.copy(), s.params["min"], s.params["max"])
    want = np.where(np.array(mask), full, x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert np.array_equal(got[:, 1], x[:, 1]) and np.array_equal(got[:, 6], x[:, 6])


@pytest.mark.parametrize(
    ("ops", "reference"),
    [
        (["rescale"], lambda a: nora_normalize_gripper_action(a, binarize=False)),
        (["rescale", "binarize"], lambda a: nora_normalize_gripper_action(a, binarize=True)),
        (["invert"], nora_invert_gripper_action),
        (
            ["rescale", "binarize", "invert"],  # NORA's LIBERO eval: normalize, then invert
            lambda a: nora_invert_gripper_action(nora_normalize_gripper_action(a, binarize=True)),
        ),
    ],
)
def test_gripper_steps_match_nora_helpers(rng, ops, reference):
    x = _x(rng)
    steps = _min_max_json(rng) + [{"op": f"gripper_{o}", "dim": -1} for o in ops]
    chain = Chain.from_json(steps, BundleError, "t").validate(D, {}, BundleError, "t")
    s = chain.unnormalize
    want = reference(lerobot_unnormalize_min_max(x.copy(), s.params["min"], s.params["max"]))
    got = chain.apply(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-14)
    assert got.size == 40 * D
    if "binarize" in ops:  # x[1, -1] = 0 -> 0.5 -> rescaled 0 -> sign 0, as NORA's np.sign gives
        assert set(np.unique(got[:, -1])) <= {-1.0, 0.0, 1.0} and got[1, -1] == 0.0


def test_gripper_on_another_dim(rng):
    x = _x(rng)
    steps = _min_max_json(rng) + [{"op": "gripper_invert", "dim": 2}]
    chain = Chain.from_json(steps, BundleError, "t").validate(D, {}, BundleError, "t")
    plain = Chain(chain.steps[:1]).apply(x)
    got = chain.apply(x)
    assert np.array_equal(got[:, 2], -plain[:, 2])
    assert np.array_equal(np.delete(got, 2, axis=1), np.delete(plain, 2, axis=1))


def test_chain_round_trip_through_manifest_json(rng, stats):
    x = _x(rng)
    chains = [
        default_chain().to_json() + [{"op": "gripper_rescale", "dim": -1}],
        [{"op": "unnormalize", "mode": "q01_q99", "key": "robot_a", "source": "norm_stats.json"}],
        _min_max_json(rng, mask=[True] * D) + [{"op": "gripper_binarize", "dim": 6}],
        [
            {
                "op": "unnormalize",
                "mode": "mean_std",
                "mean": [0.5] * D,
                "std": [2.0] * D,
                "source": "f.json[a]",
            }
        ],
    ]
    for data in chains:
        chain = Chain.from_json(data, BundleError, "t").validate(D, {"robot_a": stats}, BundleError, "t")
        text = json.dumps({"postprocess": chain.to_json()})
        back = Chain.from_json(json.loads(text)["postprocess"], BundleError, "t")
        assert back.to_json() == chain.to_json() == data
        st = chain.stats_for({"robot_a": stats}, None)
        assert np.array_equal(back.apply(x, st), chain.apply(x, st))
        assert len(back.describe()) == len(data)
    assert len(chains) == 4


def _bad_cases(rng) -> list[tuple[list, str]]:
    mm = _min_max_json(rng)[0]
    nan_min = {**mm, "min": [float("nan")] + mm["min"][1:]}
    inf_max = {**mm, "max": mm["max"][:-1] + [float("inf")]}
    flat = {**mm, "max": list(mm["min"])}
    short = {**mm, "min": mm["min"][:-1], "max": mm["max"][:-1]}
    ms = {"op": "unnormalize", "mode": "mean_std", "mean": [0.0] * D, "std": [1.0] * (D - 1) + [0.0]}
    q = {"op": "unnormalize", "mode": "q01_q99", "key": None, "source": "norm_stats.json"}
    inv = {"op": "gripper_invert", "dim": -1}
    return [
        ([], "non-empty list"),
        ([{**q, "op": "unnormalise"}], "unknown op"),
        ([{**q, "mode": "minmax"}], "unknown mode"),
        ([{**q, "scale": 2}], "unknown field"),
        ([nan_min], "postprocess[0].min: holds NaN/inf at dims [0]"),
        ([inf_max], "postprocess[0].max: holds NaN/inf at dims [6]"),
        ([flat], "min >= max at dims [0, 1, 2, 3, 4, 5, 6]"),
        ([ms], "std <= 0 at dims [6]"),
        ([short], "postprocess[0].min: has 6 dims, the action dim is 7"),
        ([{**mm, "mask": [True] * 3}], "postprocess[0].mask: has 3 entries"),
        ([{**q, "key": "nope"}], "unnorm key 'nope' does not exist"),
        ([{**mm, "key": "robot_a"}], "only mode q01_q99 takes an unnorm key"),
        ([q, mm], "exactly one unnormalize step"),
        ([inv], "exactly one unnormalize step"),
        ([inv, q], "exactly one unnormalize step"),
        ([q, inv, {"op": "gripper_invert", "dim": 6}], "gripper_invert on dim 6 applied twice"),
        ([q, {"op": "gripper_rescale", "dim": 7}], "postprocess[1].dim: 7 is out of range"),
        ([q, {"op": "gripper_rescale", "dim": -8}], "postprocess[1].dim: -8 is out of range"),
        ([q, {"op": "gripper_rescale", "dim": True}], "postprocess[1].dim: must be an int"),
        (
            [q, {"op": "gripper_binarize", "dim": -1}, {"op": "gripper_rescale", "dim": 6}],
            "after gripper_binarize",
        ),
        ([{**mm, "min": ["0"] * D}], "non-empty list of numbers"),
    ]


def test_inconsistent_chains_rejected(rng, stats):
    cases = _bad_cases(rng)
    rejected = 0
    for data, message in cases:
        with pytest.raises(BundleError, match="manifest.json: postprocess") as e:
            chain = Chain.from_json(data, BundleError, "manifest.json: postprocess")
            chain.validate(D, {"robot_a": stats}, BundleError, "manifest.json: postprocess")
        assert message in str(e.value), (message, str(e.value))
        rejected += 1
    assert rejected == len(cases) == 21


def test_q01_q99_stats_of_another_dim_rejected(stats):
    with pytest.raises(BundleError, match="norm_stats 'robot_a' have 7 dims, codec.action_dim 6"):
        default_chain().validate(6, {"robot_a": stats}, BundleError, "manifest.json: postprocess")


def test_unnorm_key_resolution(rng, stats):
    other = NormStats("robot_b", stats.q01 - 1, stats.q99 + 1)
    both = {"robot_a": stats, "robot_b": other}
    default = default_chain()
    assert default.stats_for(both, "robot_b") is other
    assert default.stats_for({"robot_a": stats}, None) is stats
    with pytest.raises(InputError, match="unnorm_key is required"):
        default.stats_for(both, None)
    with pytest.raises(InputError, match="unknown unnorm_key 'zzz'"):
        default.stats_for(both, "zzz")
    fixed = Chain.from_json(
        [{"op": "unnormalize", "mode": "q01_q99", "key": "robot_b", "source": "n"}], BundleError, "t"
    )
    assert fixed.stats_for(both, None) is other and fixed.stats_for(both, "robot_b") is other
    with pytest.raises(InputError, match="fixes its statistics"):
        fixed.stats_for(both, "robot_a")
    mm = Chain.from_json(_min_max_json(rng), BundleError, "t")
    assert mm.stats_for(both, None) is None and mm.label(None) == "meta/stats.json[action]"
    assert default.takes_unnorm_key and not fixed.takes_unnorm_key and not mm.takes_unnorm_key
    with pytest.raises(InputError, match="pass unnorm_key=None"):
        mm.stats_for(both, "robot_a")


def test_gripper_step_spec():
    assert gripper_step("invert").to_json() == {"op": "gripper_invert", "dim": -1}
    assert gripper_step("gripper_rescale:3").to_json() == {"op": "gripper_rescale", "dim": 3}
    assert gripper_step("binarize:-2").to_json() == {"op": "gripper_binarize", "dim": -2}
    for bad in ("close", "invert:x", ""):
        with pytest.raises(InputError, match="gripper step"):
            gripper_step(bad)
