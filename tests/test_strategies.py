"""The strategy registry: names declared once, behaviour one object per strategy, unknown names
refused, variants with their own parameters; the greedy strategy's arithmetic."""

import ast
from pathlib import Path

import numpy as np
import pytest

from hierarchy.contracts import strategies as declared
from hierarchy.contracts.config import ConfigError, load_config
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.taxonomy import Taxonomy
from hierarchy.infer import strategies
from hierarchy.infer.modelset import ModelRef, ModelSet
from hierarchy.infer.scoring import ScoringPlan, plan_params

ROOT = Path(__file__).resolve().parent.parent


def test_every_declared_strategy_is_one_object_in_its_own_module():
    assert len(set(declared.NAMES)) == len(declared.NAMES)
    assert sorted(declared.PREFERENCE) == sorted(declared.NAMES)
    for name in declared.NAMES:
        impl = strategies.get(name)
        assert impl.name == name and isinstance(impl, strategies.Strategy)
        assert type(impl).__module__ == declared.declared(name).module
    with pytest.raises(UsageError, match="strategy 'nope': expected one of flat"):
        strategies.get("nope")


def _name_lists(path: Path, root: Path = ROOT):
    """Literal tuples / lists / sets in ``path`` holding two or more strategy names."""
    names = set(declared.NAMES)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found = {e.value for e in node.elts if isinstance(e, ast.Constant)} & names
            if len(found) >= 2:
                yield f"{path.relative_to(root)}:{node.lineno}: {sorted(found)}"


def test_strategy_names_are_listed_in_one_module_only(tmp_path):
    home = ROOT / "hierarchy" / "contracts" / "strategies.py"
    # the model store names its model keys, four of which a strategy shares by name
    keys = ROOT / "hierarchy" / "contracts" / "modelstore.py"
    lists = [hit for path in sorted((ROOT / "hierarchy").rglob("*.py"))
             if path not in (home, keys) for hit in _name_lists(path)]
    assert not lists, "strategy names listed outside contracts/strategies.py:\n" + \
        "\n".join(lists)
    planted = tmp_path / "planted.py"  # the check sees a list where there is one
    planted.write_text('ORDER = ("flat", "fusion")\n')
    assert list(_name_lists(planted, tmp_path)) == ["planted.py:1: ['flat', 'fusion']"]


def test_a_strategy_setting_or_variant_that_names_nothing_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"'predict.strategy': 'nope' is not allowed; "
                                          r"expected one of auto, flat, two-stage"):
        load_config(overrides=["predict.strategy=nope"])
    for bad in ("{x: {strategy: nope}}",                       # no such strategy
                "{flat-2: {strategy: flat, top_branches: 1}}",   # flat reads no parameter
                "{k1: {strategy: two-stage, top_branches: -1}}",  # predict.top_branches' range
                "{flat: {strategy: flat}}",                       # a declared name
                "{Big: {strategy: flat}}"):
        with pytest.raises(ConfigError, match="config key 'variants'") as got:
            load_config(overrides=[f"variants={bad}"])
        assert "\n" not in str(got.value)
    cfg = load_config(overrides=["variants={two-stage-k1: {strategy: two-stage, "
                                 "top_branches: 1}}", "serve.strategy=two-stage-k1"])
    spec = declared.spec_of("two-stage-k1", cfg.variants)
    assert (spec.name, spec.strategy, spec.params) == ("two-stage-k1", "two-stage",
                                                       (("top_branches", 1),))
    ms = ModelSet(run_id="r", strategy=spec.name, base=spec.strategy, params=spec.params)
    assert plan_params(ms, cfg.predict) == (("top_branches", 1),)
    plain = ModelSet(run_id="r", strategy="blend")
    assert plan_params(plain, cfg.predict) == (("top_branches", cfg.predict.top_branches),
                                               ("blend_weight", cfg.predict.blend_weight))


def test_every_declared_decision_rule_is_one_object_and_an_unknown_one_is_refused():
    from hierarchy.contracts import rules as declared_rules
    from hierarchy.infer import rules

    assert load_config().decide.rule == declared_rules.NAMES[0]  # the default is the first
    for name in declared_rules.NAMES:
        assert rules.get(name).name == name
        assert type(rules.get(name)).__module__ == declared_rules.module(name)
    with pytest.raises(UsageError, match="decision rule 'nope': expected one of power-start, "):
        rules.get("nope")
    with pytest.raises(ConfigError, match="config key 'decide.rule': 'nope' is not allowed"):
        load_config(overrides=["decide.rule=nope"])


# ------------------------------------------------------------------ greedy
TAX = Taxonomy.from_rows([(10, "A", "A1", "a1"), (11, "B", "B1", "b1"), (12, "A", "A2", "a2"),
                          (13, "C", "C1", "c1"), (14, "A", "A1", "a3"), (15, "C", "C1", "c2")])


class _Scorer:
    """What a strategy reads of a BatchScorer: the plan, the taxonomy, model outputs."""

    def __init__(self, p_l1, branch):
        ref = ModelRef(key="level1", path="l1", backbone="small_cnn", image_size=32)
        self.branches = {b: ModelRef(key=f"branch/{b}", path=f"b{b}", backbone="small_cnn",
                                     image_size=32) for b in branch}
        self.plan = ScoringPlan(models=ModelSet(run_id="r", strategy="greedy", level1=ref,
                                                branches=self.branches),
                                taxonomy_json=TAX.to_json(), prior_category_id=10,
                                prior_share=0.1, params=(), aggregate="log_mean",
                                tta_flip=False, top_n=3, threads=0)
        self.taxonomy, self.p_l1, self.branch, self.calls = TAX, p_l1, branch, []

    def output(self, ref, images, cache, rows=None):
        if ref.key == "level1":
            return self.p_l1
        b = int(ref.key.split("/")[1])
        self.calls.append((b, rows.tolist()))
        return self.branch[b][rows]


def test_greedy_keeps_the_level1_model_s_probability_and_runs_one_branch_per_product():
    greedy = strategies.get("greedy") if "greedy" in declared.NAMES else None
    if greedy is None:
        pytest.skip("greedy is not registered")
    p_l1 = np.array([[0.6, 0.1, 0.3], [0.5, 0.1, 0.4], [0.2, 0.1, 0.7]])
    branch = {0: np.array([[0.7, 0.2, 0.1]] * 3), 2: np.array([[0.25, 0.75]] * 3)}
    scorer = _Scorer(p_l1, branch)
    pids = np.array([1, 1, 2])  # product 1: two pictures, its branch from both (A); 2: C
    p = greedy.probs(scorer, list(range(3)), pids, {})
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    marginal = np.stack([p[:, TAX.l1_of_l3 == b].sum(axis=1) for b in range(3)], axis=1)
    np.testing.assert_allclose(marginal, p_l1)  # the level-1 model's own, not 1.0
    assert sorted(scorer.calls) == [(0, [0, 1]), (2, [2])]  # only each product's branch ran
    a_leaves = TAX.branch(0)
    np.testing.assert_allclose(p[0, a_leaves], 0.6 * np.array([0.7, 0.2, 0.1]))
    np.testing.assert_allclose(p[0, TAX.branch(2)], [0.15, 0.15])  # spread, no model
    assert TAX.l1_of_l3[p[2].argmax()] == 2
