"""The predict stage's arithmetic, checked against plain loops written independently of it."""

import numpy as np
import pytest

from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer.combine import (
    ProductAccumulator,
    blend,
    flip_average,
    marginal_l1,
    top_n,
    two_stage,
)

# category ids interleave the branches, so branch-local order != level-3 order:
# A (l1 0): l3 0, 2, 4   B (l1 1): l3 1 (single leaf)   C (l1 2): l3 3, 5
ROWS = [
    (10, "A", "A1", "a1"),
    (11, "B", "B1", "b1"),
    (12, "A", "A2", "a2"),
    (13, "C", "C1", "c1"),
    (14, "A", "A1", "a3"),
    (15, "C", "C1", "c2"),
]
TAX = Taxonomy.from_rows(ROWS)
L1_OF_L3 = [0, 1, 0, 2, 0, 2]  # written out by hand from ROWS
LEAVES = {0: [0, 2, 4], 1: [1], 2: [3, 5]}


def dirichlet(rng, n, c):
    return rng.dirichlet(np.ones(c), size=n)


class Branches:
    """A fake set of branch models: fixed conditionals per image, records every call."""

    def __init__(self, rng, n, missing=()):
        self.cond = {b: dirichlet(rng, n, len(v)) for b, v in LEAVES.items()}
        self.missing = set(missing)
        self.calls = []

    def __call__(self, b, rows):
        self.calls.append((b, list(rows)))
        return None if b in self.missing else self.cond[b][rows]

    def conditional(self, i, l3):
        b = L1_OF_L3[l3]
        if len(LEAVES[b]) == 1:
            return 1.0
        if b in self.missing:
            return 1.0 / len(LEAVES[b])
        return self.cond[b][i, LEAVES[b].index(l3)]


def expected_two_stage(p_l1, fake, k):
    n = p_l1.shape[0]
    out = np.zeros((n, 6))
    for i in range(n):
        ranked = sorted(range(3), key=lambda b: (-p_l1[i, b], b))[:k]
        mass = sum(p_l1[i, b] for b in ranked)
        for l3 in range(6):
            if L1_OF_L3[l3] in ranked:
                out[i, l3] = p_l1[i, L1_OF_L3[l3]] * fake.conditional(i, l3) / mass
    return out


def test_small_taxonomy_is_what_the_tests_assume():
    assert TAX.l1_of_l3.tolist() == L1_OF_L3
    assert {b: v.tolist() for b, v in TAX.branches().items()} == LEAVES


@pytest.mark.parametrize("k", [0, 3, 7])
def test_two_stage_all_branches_is_the_exact_product(k):
    rng = np.random.default_rng(1)
    p_l1 = dirichlet(rng, 8, 3)
    fake = Branches(rng, 8)
    got = two_stage(p_l1, fake, TAX, k=k)
    exact = np.array(
        [[p_l1[i, L1_OF_L3[l3]] * fake.conditional(i, l3) for l3 in range(6)] for i in range(8)]
    )
    np.testing.assert_allclose(got, exact, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)
    assert got.dtype == np.float64


def test_two_stage_top2_renormalizes_over_the_kept_branches():
    rng = np.random.default_rng(2)
    p_l1 = dirichlet(rng, 20, 3)
    fake = Branches(rng, 20)
    got = two_stage(p_l1, fake, TAX, k=2)
    np.testing.assert_allclose(got, expected_two_stage(p_l1, fake, 2), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)
    assert ((got > 0).sum(axis=1) < 6).all()  # the dropped branch really has no mass


def test_two_stage_k1_puts_all_mass_in_the_argmax_branch():
    rng = np.random.default_rng(3)
    p_l1 = dirichlet(rng, 10, 3)
    fake = Branches(rng, 10)
    got = two_stage(p_l1, fake, TAX, k=1)
    for i in range(10):
        b = int(np.argmax(p_l1[i]))
        leaves = LEAVES[b]
        assert got[i, leaves].sum() == pytest.approx(1.0, abs=1e-12)
        others = [l3 for l3 in range(6) if l3 not in leaves]
        assert (got[i, others] == 0).all()
        want = [1.0] if len(leaves) == 1 else fake.cond[b][i]
        np.testing.assert_allclose(got[i, leaves], want, rtol=1e-12)


def test_two_stage_calls_each_branch_once_with_only_its_images():
    p_l1 = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.1, 0.7], [0.5, 0.4, 0.1]])
    fake = Branches(np.random.default_rng(4), 4)
    two_stage(p_l1, fake, TAX, k=1)
    # B (single leaf) is never asked; A gets rows 0 and 3, C rows 1 and 2, in one call each
    assert sorted(fake.calls) == [(0, [0, 3]), (2, [1, 2])]


def test_single_leaf_branch_takes_its_level1_probability():
    p_l1 = np.array([[0.2, 0.5, 0.3]])
    fake = Branches(np.random.default_rng(5), 1)
    got = two_stage(p_l1, fake, TAX, k=0)
    assert got[0, 1] == pytest.approx(0.5, abs=1e-15)
    assert all(b != 1 for b, _ in fake.calls)


def test_branch_without_a_model_is_uniform_over_its_leaves():
    rng = np.random.default_rng(6)
    p_l1 = dirichlet(rng, 5, 3)
    fake = Branches(rng, 5, missing={2})
    got = two_stage(p_l1, fake, TAX, k=0)
    np.testing.assert_allclose(got[:, 3], p_l1[:, 2] / 2, rtol=1e-12)
    np.testing.assert_allclose(got[:, 5], p_l1[:, 2] / 2, rtol=1e-12)
    np.testing.assert_allclose(got, expected_two_stage(p_l1, fake, 3), rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)


def test_two_stage_ties_pick_the_lowest_branch_id():
    p_l1 = np.array([[0.3, 0.35, 0.35], [0.4, 0.2, 0.4]])
    fake = Branches(np.random.default_rng(7), 2)
    got = two_stage(p_l1, fake, TAX, k=1)
    assert got[0, LEAVES[1]].sum() == pytest.approx(1.0)  # B (1) before C (2)
    assert got[1, LEAVES[0]].sum() == pytest.approx(1.0)  # A (0) before C (2)


def test_two_stage_renormalizes_float32_branch_outputs_and_checks_shapes():
    p_l1 = np.array([[0.6, 0.1, 0.3]], dtype=np.float32)

    def drifting(b, rows):
        return np.full((len(rows), len(LEAVES[b])), 0.5, dtype=np.float32)  # sums to 1.5 in A

    got = two_stage(p_l1, drifting, TAX)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got[0, LEAVES[0]], np.float64(np.float32(0.6)) / 3 / p_l1.sum(
        dtype=np.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="branch 0"):
        two_stage(p_l1, lambda b, rows: np.ones((len(rows), 5)), TAX)
    with pytest.raises(ValueError, match="3 columns"):
        two_stage(np.ones((1, 4)) / 4, drifting, TAX)


def test_blend_and_flip_average():
    rng = np.random.default_rng(8)
    a, b = dirichlet(rng, 6, 6), dirichlet(rng, 6, 6)
    for w in (0.0, 0.3, 1.0):
        got = blend(a, b, w)
        want = [[w * a[i, j] + (1 - w) * b[i, j] for j in range(6)] for i in range(6)]
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(blend(a, b, 1.0), a)
    with pytest.raises(ValueError):
        blend(a, b, 1.5)
    with pytest.raises(ValueError):
        blend(a, b[:, :5], 0.5)
    avg = flip_average(a, b)
    np.testing.assert_allclose(avg, [[(a[i, j] + b[i, j]) / 2 for j in range(6)]
                                     for i in range(6)], rtol=1e-12)
    np.testing.assert_allclose(avg.sum(axis=1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError):
        flip_average(a, b[:3])


def test_marginal_l1_sums_leaves_into_their_branch():
    rng = np.random.default_rng(9)
    p = dirichlet(rng, 7, 6)
    got = marginal_l1(p, TAX)
    want = np.zeros((7, 3))
    for i in range(7):
        for l3 in range(6):
            want[i, L1_OF_L3[l3]] += p[i, l3]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the level-1 marginal of an all-branch two-stage result gives back P(l1)
    p_l1 = dirichlet(rng, 7, 3)
    full = two_stage(p_l1, Branches(rng, 7), TAX, k=0)
    np.testing.assert_allclose(marginal_l1(full, TAX), p_l1, rtol=1e-12)


def test_marginal_l1_at_competition_scale():
    rng = np.random.default_rng(10)
    l1 = rng.integers(0, 49, size=5270)
    l1[:49] = np.arange(49)  # every branch present
    rows = [(i, f"L{b:02d}", f"M{b:02d}", f"leaf{i}") for i, b in enumerate(l1)]
    tax = Taxonomy.from_rows(rows)
    p = dirichlet(rng, 4, 5270)
    got = marginal_l1(p, tax)
    assert got.shape == (4, 49)
    want = np.stack([np.bincount(l1, weights=p[i], minlength=49) for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-10)


# --------------------------------------------------------------------------- top_n
def loop_top_n(row, n):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:n]
    return order, [row[j] for j in order]


def test_top_n_order_and_ties_by_lowest_index():
    p = np.array([[0.1, 0.3, 0.3, 0.1, 0.3, 0.2]])
    assert top_n(p, 1)[0].tolist() == [[1]]
    assert top_n(p, 2)[0].tolist() == [[1, 2]]
    assert top_n(p, 4)[0].tolist() == [[1, 2, 4, 5]]
    assert top_n(p, 5)[0].tolist() == [[1, 2, 4, 5, 0]]
    idx, probs = top_n(p, 10)  # clipped to C
    assert idx.tolist() == [[1, 2, 4, 5, 0, 3]]
    np.testing.assert_array_equal(probs, [[0.3, 0.3, 0.3, 0.2, 0.1, 0.1]])
    assert top_n(p, 0)[0].shape == (1, 0)


def test_top_n_matches_a_full_sort_at_competition_scale():
    rng = np.random.default_rng(11)
    # rounding makes many ties, including across the n-th place
    p = np.round(rng.random((16, 5270)) * 50) / 50
    p[3] = 0.0  # a row that is one big tie
    p[5, 4000] = np.nan
    idx, probs = top_n(p, 5)
    assert idx.dtype == np.int64 and idx.shape == (16, 5)
    for i in range(16):
        row = [(-np.inf if np.isnan(v) else v) for v in p[i]]
        want_idx, want_p = loop_top_n(row, 5)
        assert idx[i].tolist() == want_idx
        np.testing.assert_array_equal(probs[i], want_p)
    assert idx[3].tolist() == [0, 1, 2, 3, 4]


def test_top_n_on_float32_softmax_without_ties():
    rng = np.random.default_rng(14)
    p = dirichlet(rng, 8, 5270).astype(np.float32)
    idx, probs = top_n(p, 5)
    assert probs.dtype == np.float64
    for i in range(8):
        want_idx, want_p = loop_top_n(p[i].tolist(), 5)
        assert idx[i].tolist() == want_idx
        np.testing.assert_array_equal(probs[i], want_p)


# --------------------------------------------------------------------------- aggregation
def geometric(rows):
    g = np.array([np.prod([max(r[j], 1e-7) for r in rows]) ** (1 / len(rows))
                  for j in range(len(rows[0]))])
    return g / g.sum()


def test_log_mean_and_mean_on_a_hand_computed_product():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    for method, want in (("mean", [0.7, 0.3]), ("log_mean", [0.75, 0.25])):
        acc = ProductAccumulator(2, method=method)
        acc.add([42, 42], p)
        got, count = acc.pop(42)
        # geometric: sqrt(.45) : sqrt(.05) = 3 : 1
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert count == 2
    # one image strongly against class 0 vetoes it under log_mean but not under mean
    p = np.array([[0.98, 0.02], [0.98, 0.02], [1e-4, 0.9999]])
    means = {}
    for method in ("mean", "log_mean"):
        acc = ProductAccumulator(2, method=method)
        acc.add([1, 1, 1], p)
        means[method] = acc.pop(1)[0]
    np.testing.assert_allclose(means["mean"], p.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(means["log_mean"], geometric(p.tolist()), rtol=1e-12)
    assert np.argmax(means["mean"]) == 0 and np.argmax(means["log_mean"]) == 1


def test_log_mean_clamps_zero_probabilities_at_eps():
    acc = ProductAccumulator(2, eps=1e-7)
    acc.add([1, 1], np.array([[1.0, 0.0], [0.5, 0.5]]))
    got, _ = acc.pop(1)
    g = np.array([np.sqrt(0.5), np.sqrt(0.5e-7)])
    np.testing.assert_allclose(got, g / g.sum(), rtol=1e-12)


@pytest.mark.parametrize("method", ["log_mean", "mean"])
def test_accumulator_does_not_depend_on_batching_or_order(method):
    rng = np.random.default_rng(12)
    ids = np.array([7, 3, 7, 9, 3, 7, 12, 9, 3, 7], dtype=np.int64)
    p = dirichlet(rng, len(ids), 5)
    one = ProductAccumulator(5, method=method)
    one.add(ids, p)
    ref_ids, ref_p, ref_n = one.finish()
    assert ref_ids.tolist() == [3, 7, 9, 12] and ref_n.tolist() == [3, 4, 2, 1]
    assert len(one) == 0
    for i, pid in enumerate(ref_ids):
        rows = p[ids == pid].tolist()
        want = geometric(rows) if method == "log_mean" else np.mean(rows, axis=0)
        np.testing.assert_allclose(ref_p[i], want, rtol=1e-12)
    np.testing.assert_allclose(ref_p.sum(axis=1), 1.0, rtol=1e-12)
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(len(ids))
        cuts = sorted(np.random.default_rng(seed + 100).choice(range(1, len(ids)), 3, False))
        acc = ProductAccumulator(5, method=method)
        for part in np.split(perm, cuts):
            acc.add(ids[part], p[part])
        got_ids, got_p, got_n = acc.finish()
        np.testing.assert_array_equal(got_ids, ref_ids)
        np.testing.assert_array_equal(got_n, ref_n)
        np.testing.assert_allclose(got_p, ref_p, rtol=1e-12)


def test_streaming_sorted_products_holds_at_most_one_across_batches():
    rng = np.random.default_rng(13)
    ids = np.repeat(np.arange(100, 112), rng.integers(1, 5, size=12)).astype(np.int64)
    p = dirichlet(rng, len(ids), 4)
    whole = ProductAccumulator(4)
    whole.add(ids, p)
    ref_ids, ref_p, ref_n = whole.finish()

    acc = ProductAccumulator(4)
    out_ids, out_p, out_n = [], [], []
    for start in range(0, len(ids), 3):  # batches cut through products
        acc.add(ids[start:start + 3], p[start:start + 3])
        done = acc.pop_all_except(ids[start:start + 3][-1])
        assert len(acc) == 1
        for lst, arr in zip((out_ids, out_p, out_n), done):
            lst.extend(arr)
    for lst, arr in zip((out_ids, out_p, out_n), acc.finish()):
        lst.extend(arr)
    assert len(acc) == 0
    assert out_ids == ref_ids.tolist() and out_n == ref_n.tolist()
    np.testing.assert_allclose(np.array(out_p), ref_p, rtol=1e-12)


def test_accumulator_pop_forgets_and_rejects_bad_input():
    acc = ProductAccumulator(3, method="mean")
    acc.add(np.array([5]), np.array([[0.2, 0.3, 0.5]]))
    assert 5 in acc and acc.pending() == [5]
    probs, count = acc.pop(5)
    np.testing.assert_allclose(probs, [0.2, 0.3, 0.5])
    assert count == 1 and 5 not in acc
    with pytest.raises(KeyError):
        acc.pop(5)
    with pytest.raises(ValueError):
        acc.add([1, 2], np.ones((3, 3)) / 3)
    with pytest.raises(ValueError):
        acc.add([1], np.ones((1, 4)) / 4)
    with pytest.raises(ValueError):
        ProductAccumulator(3, method="median")
    acc.add(np.zeros(0, dtype=np.int64), np.zeros((0, 3)))
    ids, probs, counts = acc.finish()
    assert ids.shape == (0,) and probs.shape == (0, 3) and counts.shape == (0,)


# --------------------------------------------------------------------------- issue 13: the
# combination done at the product level, the correction of flat, calibration, smoothing
from hierarchy.infer.combine import (  # noqa: E402
    apply_temperature,
    group_mean_log,
    hierarchical_correction,
    leaf_conditional,
    nll,
    product_branches,
)
from hierarchy.train.targets import kinship_smoothing, smoothing_targets  # noqa: E402


def test_product_level_top_k_at_k_all_is_the_exact_product():
    rng = np.random.default_rng(3)
    p_l1 = dirichlet(rng, 7, 3)
    groups = np.array([5, 5, 9, 9, 9, 2, 4])
    fake = Branches(rng, 7)
    mask = product_branches(p_l1, groups, k=3)
    assert mask.all()
    got = two_stage(p_l1, fake, TAX, expanded=mask)
    np.testing.assert_allclose(got, two_stage(p_l1, fake, TAX, k=0), atol=1e-12)


def test_every_picture_of_a_product_expands_the_product_top_branches():
    # picture 0 prefers A, picture 1 prefers C; the product as a whole prefers C
    p_l1 = np.array([[0.55, 0.0, 0.45], [0.05, 0.0, 0.95]])
    groups = np.array([1, 1])
    mask = product_branches(p_l1, groups, k=1)
    assert mask.tolist() == [[False, False, True], [False, False, True]]
    fake = Branches(np.random.default_rng(0), 2)
    per_product = ProductAccumulator(6)
    per_product.add(groups, two_stage(p_l1, fake, TAX, expanded=mask))
    product, _ = per_product.pop(1)
    # per-picture truncation: each picture vetoes the other's branch (eps on all its leaves)
    per_image = ProductAccumulator(6)
    per_image.add(groups, two_stage(p_l1, fake, TAX, k=1))
    vetoed, _ = per_image.pop(1)
    assert product[[3, 5]].sum() == pytest.approx(1.0)
    assert vetoed[[3, 5]].sum() < 0.9  # mass leaked to the branch picture 1 ruled out
    # the geometric mean of the pictures' level-1 rows, per product
    np.testing.assert_allclose(group_mean_log(p_l1[:, [0, 2]], groups)[0],
                               [np.sqrt(.55 * .05), np.sqrt(.45 * .95)]
                               / (np.sqrt(.55 * .05) + np.sqrt(.45 * .95)))


def test_the_correction_is_flat_at_zero_weights_and_rows_sum_to_one():
    rng = np.random.default_rng(4)
    flat = dirichlet(rng, 20, 6)
    branch = leaf_conditional(dirichlet(rng, 20, 6), TAX)
    branch[:5, [0, 2, 4]] = np.nan  # branch A not scored for the first five pictures
    l1 = dirichlet(rng, 20, 3)
    np.testing.assert_allclose(hierarchical_correction(flat, TAX, 0, 0, branch, l1), flat,
                               atol=1e-12)
    for w, v in ((1, 0), (0, 1), (0.7, 1.3)):
        got = hierarchical_correction(flat, TAX, w, v, branch, l1)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
        assert (got >= 0).all()
    # w = 1, v = 1 with every branch scored: exactly the two-stage product P(b) P(l3 | b)
    full = leaf_conditional(dirichlet(rng, 20, 6), TAX)
    got = hierarchical_correction(flat, TAX, 1, 1, full, l1)
    np.testing.assert_allclose(got, l1[:, TAX.l1_of_l3] * full, atol=1e-9)
    # an unscored branch keeps flat's conditional inside it
    cond = leaf_conditional(hierarchical_correction(flat, TAX, 1, 0, branch, l1), TAX)
    np.testing.assert_allclose(cond[:5, [0, 2, 4]], leaf_conditional(flat, TAX)[:5, [0, 2, 4]],
                               atol=1e-9)


def test_temperature_fitting_lowers_the_nll_of_an_overconfident_model():
    rng = np.random.default_rng(5)
    n, c = 2000, 10
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += 1.0  # informative, but far from certain
    exp = np.exp(5.0 * logits)  # then made five times too confident
    overconfident = exp / exp.sum(axis=1, keepdims=True)
    def fitted(p):  # the NLL-best temperature of a fine grid, as evaluate fits one
        return min(np.geomspace(0.2, 20, 241), key=lambda t: nll(apply_temperature(p, t), labels))

    t = fitted(overconfident)
    assert 3.0 < t < 7.0
    assert nll(apply_temperature(overconfident, t), labels) < nll(overconfident, labels) - 0.5
    # ranking (so accuracy) is unchanged by a temperature
    assert (apply_temperature(overconfident, t).argmax(1) == overconfident.argmax(1)).all()
    calibrated = apply_temperature(overconfident, t)
    assert fitted(calibrated) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rows", [ROWS, [(1, "A", "A1", "x"), *[(10 + i, "B", "B1", f"b{i}")
                                                                 for i in range(12)],
                                         (2, "C", "C1", "y")]])
def test_kinship_smoothing_rows_sum_to_one_and_favour_siblings(rows):
    tax = Taxonomy.from_rows(rows)
    k = kinship_smoothing(tax, 0.1)
    full = smoothing_targets(k, tax, np.arange(tax.n_l3))
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-12)
    l1, l2 = tax.l1_of_l3, tax.l2_of_l3
    for i in range(tax.n_l3):
        assert full[i, i] >= 0.9 - 1e-12
        sib = [j for j in range(tax.n_l3) if j != i and l2[j] == l2[i]]
        strangers = [j for j in range(tax.n_l3) if l1[j] != l1[i]]
        if sib and strangers:
            assert min(full[i, sib]) >= max(full[i, strangers])
        if sib and strangers and len(sib) <= len(strangers):
            assert min(full[i, sib]) > max(full[i, strangers])
    assert (smoothing_targets(kinship_smoothing(tax, 0.0), tax, [0]) ==
            np.eye(tax.n_l3)[0]).all()


def test_whole_products_never_split_a_product_across_chunks():
    import pandas as pd

    from hierarchy.infer.scoring import whole_products

    ids = [1, 1, 2, 2, 2, 3, 4, 4, 5]
    batches = [pd.DataFrame({"product_id": ids[i:j], "x": range(i, j)})
               for i, j in ((0, 3), (3, 4), (4, 4), (4, 7), (7, 9))]
    chunks = list(whole_products(iter(batches)))
    assert [c["product_id"].tolist() for c in chunks] == [[1, 1], [2, 2, 2, 3], [4, 4], [5]]
    assert sum(len(c) for c in chunks) == len(ids)
    assert pd.concat(chunks)["x"].tolist() == list(range(9))


# --------------------------------------------------------------------------- the fitted
# correction of the hierarchical strategy (what evaluate's calibration sums per task)
from hierarchy.evaluate.calibrate import (  # noqa: E402
    best_correction,
    correction_grid,
    correction_stats,
)
from hierarchy.infer.combine import corrected  # noqa: E402


def test_grid_starts_with_the_uncorrected_model_once():
    grid = correction_grid([0.5, 1.0], [0.0, 1.0], [0.0])
    assert tuple(grid[0]) == (1.0, 0.0, 0.0)
    assert len(grid) == len({tuple(g) for g in grid}) == 4


def test_correction_stats_sum_over_tasks_and_match_the_product_aggregate():
    rng = np.random.default_rng(5)
    n = 40
    products = rng.integers(0, 15, n)
    p3 = dirichlet(rng, n, TAX.n_l3)
    p1 = dirichlet(rng, n, TAX.n_l1)
    cond = np.stack([leaf_conditional(dirichlet(rng, n, TAX.n_l3), TAX)[i] for i in range(n)])
    truth = rng.integers(0, TAX.n_l3, 15)
    labels = truth[products]
    grid = correction_grid([0.5, 1.0, 2.0], [0.0, 0.5, 1.0], [0.0, 1.0])
    hits, nlls, count = correction_stats(p3, TAX, grid, products, labels, cond, p1)
    assert count == len(np.unique(products))
    # identity point = the model's own product-level (log_mean) answer
    ids, first = np.unique(products, return_index=True)
    agg = group_mean_log(p3, products)[first]
    assert hits[0] == np.sum(agg.argmax(1) == truth[ids])
    assert nlls[0] == pytest.approx(-np.sum(np.log(agg[np.arange(ids.size), truth[ids]])))
    # the products split over two "tasks" give the same sums
    part = np.isin(products, ids[:7])
    a = correction_stats(p3[part], TAX, grid, products[part], labels[part], cond[part], p1[part])
    b = correction_stats(p3[~part], TAX, grid, products[~part], labels[~part], cond[~part],
                         p1[~part])
    np.testing.assert_allclose(a[0] + b[0], hits)
    np.testing.assert_allclose(a[1] + b[1], nlls)
    # the chosen point never has fewer hits than the uncorrected model
    best = best_correction(grid, hits, nlls)
    assert hits[best] >= hits[0] and hits[best] == hits.max()


def test_corrected_at_identity_is_the_model_and_at_w1_v1_the_experts_product():
    rng = np.random.default_rng(8)
    p3 = dirichlet(rng, 6, TAX.n_l3)
    p1 = dirichlet(rng, 6, TAX.n_l1)
    cond = leaf_conditional(dirichlet(rng, 6, TAX.n_l3), TAX)
    np.testing.assert_allclose(corrected(p3, TAX, 1.0, 0.0, 0.0, cond, p1), p3, atol=1e-12)
    # w = v = 1 replaces both halves of P(l3) = P(b) P(l3|b) by the experts'
    full = corrected(p3, TAX, 1.0, 1.0, 1.0, cond, p1)
    np.testing.assert_allclose(full, p1[:, TAX.l1_of_l3] * cond, atol=1e-6)


def test_correction_within_expert_groups():
    """One group of every leaf (experts = a refit of the whole head): w = 1 gives the experts'
    distribution itself; level-1 groups (the default) keep the flat branch mass at w = 1."""
    rng = np.random.default_rng(7)
    flat = rng.dirichlet(np.ones(TAX.n_l3), size=5)
    refit = rng.dirichlet(np.ones(TAX.n_l3), size=5)
    one = np.zeros(TAX.n_l3, np.int64)
    np.testing.assert_allclose(leaf_conditional(flat, TAX, one), flat, atol=1e-12)
    got = hierarchical_correction(flat, TAX, w=1.0, p_branch=refit, expert_groups=one)
    np.testing.assert_allclose(got, refit, atol=1e-9)
    np.testing.assert_allclose(hierarchical_correction(flat, TAX, p_branch=refit,
                                                       expert_groups=one), flat, atol=1e-12)
    branch_cond = leaf_conditional(refit, TAX)
    kept = hierarchical_correction(flat, TAX, w=1.0, p_branch=branch_cond)
    np.testing.assert_allclose(marginal_l1(kept, TAX), marginal_l1(flat, TAX), atol=1e-9)
    np.testing.assert_allclose(leaf_conditional(kept, TAX), branch_cond, atol=1e-9)
