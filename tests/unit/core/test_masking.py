"""The GMT mask: kept fractions per scope, ties, zeros, sampling accuracy, compile."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gmt_mlx.core.masking import apply_masks, gmt_masks, group_units, random_masks


def grad_tree(seed: int = 0):
    """A gradient-shaped tree: two blocks, an embedding with zero rows, a big tensor."""
    mx.random.seed(seed)
    return {
        "model": {
            "embed_tokens": {"weight": mx.concatenate([mx.zeros((300, 64)), mx.random.normal((200, 64))])},
            "layers": [
                {
                    "q": {"weight": mx.random.normal((128, 128))},
                    "mlp": {"weight": mx.random.normal((256, 128)) * 3},
                    "norm": {"weight": mx.random.normal((128,))},
                }
                for _ in range(2)
            ],
        },
        "lm_head": {"weight": mx.random.normal((500, 64))},
    }


def kept_fraction(masks, names):
    flat = dict(tree_flatten(masks))
    kept = sum(flat[n].sum().item() for n in names)
    return kept / sum(flat[n].size for n in names)


@pytest.mark.parametrize("mask_ratio", [0.1, 0.5, 0.9])
def test_tensor_scope_kept_fraction(mask_ratio):
    grads = grad_tree()
    masks, kept = gmt_masks(grads, mask_ratio, "tensor", mx.random.key(1))
    for name, g in tree_flatten(grads):
        if g.size < 10_000:
            continue
        nonzero = (g != 0).sum().item() / g.size
        expected = min(1 - mask_ratio, nonzero)  # zeros are never kept
        assert abs(kept_fraction(masks, [name]) - expected) <= 0.01, name
    total_kept = sum(m.sum().item() for _, m in tree_flatten(masks))
    assert kept.item() == total_kept  # the reported count is the real one, exactly


@pytest.mark.parametrize("mask_ratio", [0.2, 0.7])
def test_layer_scope_kept_fraction_per_block(mask_ratio):
    grads = grad_tree()
    masks, _ = gmt_masks(grads, mask_ratio, "layer", mx.random.key(2))
    units = group_units([n for n, _ in tree_flatten(grads)], "layer")
    assert set(units) == {"model.layers.0", "model.layers.1", "model.embed_tokens.weight", "lm_head.weight"}
    for block in ("model.layers.0", "model.layers.1"):
        assert abs(kept_fraction(masks, units[block]) - (1 - mask_ratio)) <= 0.01


@pytest.mark.parametrize("mask_ratio", [0.3, 0.8])
def test_global_scope_kept_fraction(mask_ratio):
    grads = grad_tree()
    masks, _ = gmt_masks(grads, mask_ratio, "global", mx.random.key(3))
    names = [n for n, _ in tree_flatten(grads)]
    assert abs(kept_fraction(masks, names) - (1 - mask_ratio)) <= 0.01
    # One threshold: every kept |g| is >= every dropped non-zero |g| (up to ties).
    flat_g = {n: np.abs(np.array(g)) for n, g in tree_flatten(grads)}
    flat_m = {n: np.array(m) for n, m in tree_flatten(masks)}
    kept_min = min(flat_g[n][flat_m[n]].min() for n in names if flat_m[n].any())
    dropped_max = max(flat_g[n][~flat_m[n]].max() for n in names if (~flat_m[n]).any())
    assert dropped_max <= kept_min


@pytest.mark.parametrize("scope", ["tensor", "layer", "global"])
def test_ties_keep_the_target_fraction(scope):
    """A constant gradient has one value: thresholding alone would keep all or nothing."""
    # One value per unit under every scope (global pools both tensors).
    value = 1.0 if scope == "global" else 0.5
    grads = {"layers": [{"w": mx.ones((200, 100))}, {"w": mx.full((100, 150), value)}]}
    masks, _ = gmt_masks(grads, 0.4, scope, mx.random.key(0))
    for name, m in tree_flatten(masks):
        assert abs(m.sum().item() / m.size - 0.6) <= 0.01, name
        # The chosen ties are spread over the tensor, not a leading block.
        rows = np.array(m).reshape(m.shape[0], -1).mean(axis=1)
        assert rows.min() > 0.3 and rows.max() < 0.9


def test_exact_zeros_are_never_kept():
    g = mx.concatenate([mx.zeros((7000,)), mx.random.normal((3000,), key=mx.random.key(0))])
    masks, kept = gmt_masks({"w": g}, 0.5, "tensor", mx.random.key(0))
    m = masks["w"]
    assert not m[:7000].any().item()
    assert m[7000:].all().item()  # fewer non-zeros than the target: keep them all
    assert kept.item() == 3000


def test_sampled_threshold_is_accurate_on_a_large_tensor():
    """2M entries, a 65536-entry sample: kept fraction within the 1% bound, and far tighter."""
    g = mx.random.normal((2000, 1000), key=mx.random.key(4)) * mx.random.uniform(shape=(2000, 1), key=mx.random.key(5))
    for mask_ratio in (0.1, 0.5, 0.9):
        masks, _ = gmt_masks({"w": g}, mask_ratio, "tensor", mx.random.key(6))
        assert abs(masks["w"].sum().item() / g.size - (1 - mask_ratio)) < 0.005


def test_small_units_are_exact():
    g = mx.random.normal((100, 100), key=mx.random.key(7))
    masks, kept = gmt_masks({"w": g}, 0.37, "tensor", mx.random.key(0), sample_size=65536)
    assert masks["w"].sum().item() == 10_000 - 3700 == kept.item()
    # Exactly the largest-|g| entries.
    order = np.argsort(-np.abs(np.array(g)).ravel())
    expected = np.zeros(10_000, bool)
    expected[order[:6300]] = True
    assert (np.array(masks["w"]).ravel() == expected).all()


def test_masks_compile_to_the_same_result():
    grads = grad_tree(1)
    key = mx.random.key(9)
    eager, eager_kept = gmt_masks(grads, 0.5, "layer", key)
    compiled, compiled_kept = mx.compile(lambda g, k: gmt_masks(g, 0.5, "layer", k))(grads, key)
    for (n, a), (_, b) in zip(tree_flatten(eager), tree_flatten(compiled)):
        assert mx.array_equal(a, b).item(), n
    assert eager_kept.item() == compiled_kept.item()


def test_apply_masks_zeroes_dropped_entries():
    grads = grad_tree()
    masks, _ = gmt_masks(grads, 0.5, "tensor", mx.random.key(0))
    masked = apply_masks(grads, masks)
    for (n, g), (_, m), (_, out) in zip(tree_flatten(grads), tree_flatten(masks), tree_flatten(masked)):
        assert mx.array_equal(out, mx.where(m, g, 0)).item(), n


def test_random_masks_fraction_and_resampling():
    grads = {"w": mx.ones((300, 300))}
    a, kept = random_masks(grads, 0.3, mx.random.key(0))
    b, _ = random_masks(grads, 0.3, mx.random.key(1))
    assert abs(a["w"].mean().item() - 0.7) < 0.001
    assert kept.item() == a["w"].sum().item()
    assert not mx.array_equal(a["w"], b["w"]).item()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_mask_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match="mask_ratio"):
        gmt_masks({"w": mx.ones((4,))}, bad)


def test_unknown_scope():
    with pytest.raises(ValueError, match="scope"):
        gmt_masks({"w": mx.ones((4,))}, 0.5, "row")


# --- Sampled units (more than sample_size entries): the systematic sample ---------------


def unit_kept(masks, name="w"):
    m = dict(tree_flatten(masks))[name]
    return m.sum().item() / m.size


def test_sampled_units_report_the_exact_count():
    g = mx.random.normal((600, 700), key=mx.random.key(11))
    for scope in ("tensor", "global"):
        masks, kept = gmt_masks({"w": g, "v": g[:300] * 2}, 0.3, scope, mx.random.key(1))
        assert kept.item() == sum(m.sum().item() for _, m in tree_flatten(masks))


def test_sample_entries_hold_the_error_constant():
    from gmt_mlx.core.masking import sample_entries

    assert sample_entries(65536, 0.5) == 65536
    assert sample_entries(65536, 0.2) == math.ceil(0.64 * 65536)
    for r in (0.01, 0.2, 0.5, 0.9):
        n = sample_entries(65536, r)
        assert math.sqrt(r * (1 - r) / n) <= 1 / (2 * math.sqrt(65536)) + 1e-12


def structured_gradients():
    """Large tensors built to trip a systematic sample up."""
    key = mx.random.key(21)
    normal = mx.random.normal((1024, 1024), key=key)
    # Every 16th entry (every 16th column: 1024 % 16 == 0) is 100x larger: a
    # stride of 16 would see all or none of them.
    periodic = normal * mx.where(mx.arange(1024) % 16 == 0, 100.0, 1.0)
    # Column scales spread over four decades, one dominant column.
    col_scale = 10 ** mx.random.uniform(-2, 2, (1, 576), key=mx.random.key(22))
    columns = mx.random.normal((700, 576), key=mx.random.key(23)) * col_scale
    # An embedding gradient: 40% of the rows (tokens absent from the batch) are zero.
    rows = mx.random.normal((2000, 64), key=mx.random.key(24)) * (
        mx.random.uniform(shape=(2000, 1), key=mx.random.key(25)) > 0.4
    )
    # bfloat16 gradients: 8 mantissa bits, so many exact ties at any threshold.
    low_precision = mx.random.normal((800, 800), key=mx.random.key(26)).astype(mx.bfloat16)
    # A k/v projection's shape (576 x 192): no stride near the ideal 2-3 is
    # coprime with 192, so it is sampled 2-3 adjacent entries per 5.
    kv_scale = 10 ** mx.random.uniform(-2, 2, (1, 192), key=mx.random.key(27))
    kv_columns = mx.random.normal((576, 192), key=mx.random.key(28)) * kv_scale
    return {
        "periodic": periodic,
        "columns": columns,
        "rows": rows,
        "low_precision": low_precision,
        "constant": mx.full((1000, 900), 0.25),
        "kv_columns": kv_columns,
    }


def test_sample_takes_adjacent_entries_when_no_short_stride_fits():
    from gmt_mlx.core.masking import pool_plan, sample_entries, sample_stride

    # 576 x 192 at r = 0.2: the ideal stride is 2.6, and 2 and 3 divide 192.
    assert sample_stride(110592, sample_entries(65536, 0.2), [192]) == (5, 2)
    assert sample_stride(110592, sample_entries(65536, 0.5), [192]) == (5, 3)
    # A stride near the ideal one that fits: one entry per stride.
    assert sample_stride(884736, sample_entries(65536, 0.2), [1536]) == (23, 1)  # 21 = 3 x 7 shares a 3 with 1536
    stride, width, counts = pool_plan([mx.zeros((576, 192))], 65536, 0.2)
    assert (stride, width) == (5, 2) and abs(counts[0] * width - sample_entries(65536, 0.2)) < 0.1 * 41944


@pytest.mark.parametrize("mask_ratio", [0.2, 0.5, 0.8])
def test_sampled_tensor_units_keep_their_fraction(mask_ratio):
    grads = structured_gradients()
    for seed in range(3):
        masks, _ = gmt_masks(grads, mask_ratio, "tensor", mx.random.key(seed))
        for name, g in grads.items():
            nonzero = (g != 0).sum().item() / g.size
            expected = min(1 - mask_ratio, nonzero)
            assert abs(unit_kept(masks, name) - expected) <= 0.01, (name, seed)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sampled_multi_tensor_units_keep_their_fraction(scope):
    grads = {"layers": [structured_gradients(), {k: v * 0.5 for k, v in structured_gradients().items()}]}
    names = [n for n, _ in tree_flatten(grads)]
    for seed in range(2):
        masks, kept = gmt_masks(grads, 0.3, scope, mx.random.key(seed))
        for unit, members in group_units(names, scope).items():
            flat_m, flat_g = dict(tree_flatten(masks)), dict(tree_flatten(grads))
            size = sum(flat_g[n].size for n in members)
            nonzero = sum((flat_g[n] != 0).sum().item() for n in members) / size
            got = sum(flat_m[n].sum().item() for n in members) / size
            assert abs(got - min(0.7, nonzero)) <= 0.01, (unit, seed)


def test_large_constant_gradient_spreads_its_ties():
    g = mx.full((1000, 900), 0.25)
    masks, kept = gmt_masks({"w": g}, 0.4, "tensor", mx.random.key(0))
    m = np.array(masks["w"])
    assert abs(m.mean() - 0.6) <= 0.01 and kept.item() == m.sum()
    rows, cols = m.mean(axis=1), m.mean(axis=0)
    assert rows.min() > 0.5 and rows.max() < 0.7 and cols.min() > 0.45 and cols.max() < 0.75


@pytest.mark.slow
def test_sampled_masks_compile_to_the_same_result():
    grads = structured_gradients()
    key = mx.random.key(5)
    for scope in ("tensor", "global"):
        eager, eager_kept = gmt_masks(grads, 0.3, scope, key)
        compiled, compiled_kept = mx.compile(lambda g, k: gmt_masks(g, 0.3, scope, k))(grads, key)
        for (n, a), (_, b) in zip(tree_flatten(eager), tree_flatten(compiled)):
            assert mx.array_equal(a, b).item(), (scope, n)
        assert eager_kept.item() == compiled_kept.item()


def test_random_masks_are_fresh_per_key_and_even_over_positions():
    grads = {"w": mx.ones((400, 500))}
    a, _ = random_masks(grads, 0.3, mx.random.key(0))
    b, _ = random_masks(grads, 0.3, mx.random.key(1))
    a, b = np.array(a["w"]), np.array(b["w"])
    # Independent draws overlap on (1-r)^2 + r^2 of the entries.
    assert abs((a == b).mean() - (0.7**2 + 0.3**2)) < 0.01
    assert abs(a.mean(axis=0).mean() - 0.7) < 0.01 and a.mean(axis=0).min() > 0.55 and a.mean(axis=1).min() > 0.55


# --- Ties: a uniform position rank (issue 13) ---------------------------------------------


def heavily_tied(shape, key):
    """Three magnitudes, a third of the entries each, at scattered positions."""
    levels = mx.array([0.25, 0.5, 1.0])
    return levels[mx.random.randint(0, 3, shape, key=key)] * mx.where(
        mx.random.uniform(shape=shape, key=key) < 0.5, -1, 1
    )


@pytest.mark.parametrize("mask_ratio", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("case", ["small constant", "large constant", "small tied", "odd-shaped constant"])
def test_tied_tensors_keep_their_fraction_within_a_tenth_of_a_percent(mask_ratio, case):
    """The 8-bit rank kept 1.39% instead of 1% of a constant tensor at ratio 0.99."""
    g = {
        "small constant": mx.full((250, 200), 0.5),  # 50k entries: the exact path
        "large constant": mx.full((1000, 900), 0.5),  # sampled
        "small tied": heavily_tied((250, 200), mx.random.key(3)),
        "odd-shaped constant": mx.full((37, 1111), 2.0),
    }[case]
    for seed in range(3):
        masks, kept = gmt_masks({"w": g}, mask_ratio, "tensor", mx.random.key(seed))
        assert abs(kept.item() / g.size - (1 - mask_ratio)) <= 0.001, seed


def test_position_rank_is_uniform():
    from gmt_mlx.core.masking import position_rank

    rank = np.array(position_rank((1024, 1024))).ravel()
    counts = np.bincount(rank, minlength=65536)
    assert 14 <= counts.min() and counts.max() <= 18  # 16 each, give or take the hash's spread
    # Every cut keeps its share (the 8-bit rank gave rank 0 a double share:
    # a cut of 1 of 255 kept 2 / 256 of the positions).
    for cut in (1, 655, 6554, 32768, 58982):
        assert abs((rank < cut).mean() - cut / 65536) < 2e-5, cut


# --- High mask ratios: the sample grows with 1 / (1 - r) ----------------------------------


def exact_keep(g: np.ndarray, mask_ratio: float) -> np.ndarray:
    a = np.abs(g).ravel()
    keep = a.size - int(round(mask_ratio * a.size))
    out = np.zeros(a.size, bool)
    out[np.argsort(-a, kind="stable")[:keep]] = True
    return out


@pytest.mark.parametrize("mask_ratio", [0.9, 0.95, pytest.param(0.99, marks=pytest.mark.slow)])
def test_high_ratios_keep_their_count_and_the_exact_set(mask_ratio):
    """Kept count within 5% of its target and Jaccard >= 0.9 with the exact mask (issue 13)."""
    for seed in range(3):
        key = mx.random.key(40 + seed)
        g = mx.random.normal((2048, 1000), key=key) * mx.random.uniform(0.1, 2.0, (1, 1000), key=mx.random.key(seed))
        masks, kept = gmt_masks({"w": g}, mask_ratio, "tensor", mx.random.key(seed))
        target = g.size - round(mask_ratio * g.size)
        assert abs(kept.item() - target) <= 0.05 * target, (seed, kept.item(), target)
        got, exact = np.array(masks["w"]).ravel(), exact_keep(np.array(g), mask_ratio)
        jaccard = (got & exact).sum() / (got | exact).sum()
        assert jaccard >= 0.9, (seed, jaccard)


def test_sample_grows_at_high_ratios_and_is_bounded():
    from gmt_mlx.core.masking import sample_entries

    s = 65536
    assert sample_entries(s, 0.5) == s and sample_entries(s, 0.8) == math.ceil(0.64 * s)
    for r in (0.9, 0.95, 0.99):
        n = sample_entries(s, r)
        # Relative standard deviation of the kept count: 2.5 / sqrt(s) (~1%).
        assert math.sqrt(r * (1 - r) / n) / (1 - r) <= 2.5 / math.sqrt(s) + 1e-12
    assert sample_entries(s, 0.9999) == 16 * s


def test_a_ratio_that_drops_nothing_keeps_every_non_zero_entry():
    """round(mask_ratio * size) == 0: no entry is dropped, even from a sampled unit."""
    g = mx.random.normal((1000, 1000), key=mx.random.key(8)) * (mx.arange(1000) % 7 != 0)
    for scope in ("tensor", "global"):
        masks, kept = gmt_masks({"w": g, "b": g[:10, :10]}, 1e-7, scope, mx.random.key(1))
        for name, m in tree_flatten(masks):
            assert mx.array_equal(m, dict(tree_flatten({"w": g, "b": g[:10, :10]}))[name] != 0).item(), (scope, name)


# --- The random control: GMT's eligible entries and count (docs/design.md decision 9) ----------


@pytest.mark.parametrize("scope", ["tensor", "layer", "global"])
def test_random_control_draws_gmts_count_from_gmts_eligible_entries(scope):
    grads = grad_tree(2)
    gmt, gmt_kept = gmt_masks(grads, 0.5, scope, mx.random.key(0))
    rnd, rnd_kept = random_masks(grads, 0.5, mx.random.key(0), scope)
    flat_g, flat_gmt, flat_rnd = dict(tree_flatten(grads)), dict(tree_flatten(gmt)), dict(tree_flatten(rnd))
    for name, g in flat_g.items():
        zero = np.array(g) == 0
        assert not np.array(flat_rnd[name])[zero].any(), name  # never an entry GMT cannot keep
    units = group_units(list(flat_g), scope)
    for unit, members in units.items():
        a = sum(flat_gmt[n].sum().item() for n in members)
        b = sum(flat_rnd[n].sum().item() for n in members)
        size = sum(flat_g[n].size for n in members)
        # Small units are exact: the same count. A sampled unit: both within its sampling error.
        assert abs(a - b) <= (0 if size <= 65536 else 0.01 * size), (unit, a, b)
    # ... but not the same entries: at ratio 0.5 a random draw overlaps GMT's on about half.
    w = "model.layers.0.mlp.weight"
    overlap = (np.array(flat_gmt[w]) & np.array(flat_rnd[w])).sum() / np.array(flat_gmt[w]).sum()
    assert 0.4 < overlap < 0.6


def test_random_control_on_a_sampled_unit_keeps_gmts_fraction():
    g = mx.random.normal((1000, 900), key=mx.random.key(9)) * (
        mx.random.uniform(shape=(1000, 1), key=mx.random.key(1)) > 0.3
    )
    for ratio in (0.2, 0.9):
        masks, kept = random_masks({"w": g}, ratio, mx.random.key(2))
        nonzero = (g != 0).sum().item()
        assert not (np.array(masks["w"]) & (np.array(g) == 0)).any()
        target = min(g.size - round(ratio * g.size), nonzero)
        assert abs(kept.item() - target) <= 0.05 * target
