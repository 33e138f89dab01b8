"""The evaluation report of one run: report.json, report.md and its PNG figures.

``hierarchy evaluate`` writes them under ``<output>/evaluation/<run_id>/`` (see
:func:`evaluation_dir`); :func:`write_report` writes into whatever folder it is given.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Dict, List, Optional

from hierarchy.contracts import storage
from hierarchy.evaluate.plots import plot_confusion, plot_risk_coverage, plot_training_curves

HEADLINE = (
    ("accuracy L1", "accuracy_l1"),
    ("accuracy L2", "accuracy_l2"),
    ("accuracy L3", "accuracy_l3"),
    ("top-5 accuracy", "top5_accuracy"),
    ("hierarchical F1", "hierarchical_f1"),
)


def evaluation_dir(output: str, run_id: str) -> str:
    return storage.join(output, "evaluation", run_id)


def confusion_file(strategy: str) -> str:
    # strategy names go into a file name: keep them to safe characters
    return f"confusion_l1_{re.sub(r'[^A-Za-z0-9_.-]', '_', strategy)}.png"


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _table(header: List[str], rows: List[List[str]],
           align: Optional[List[str]] = None) -> List[str]:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _branch_rows(metrics: dict, order: List[str]) -> tuple:
    strategies = metrics["strategies"]
    branches: Dict[int, dict] = {}
    for s in order:
        for b in strategies[s]["per_branch"]:
            branches.setdefault(b["l1"], {"name": b["name"], "by": {}})["by"][s] = b
    same_counts = all(
        len({b["by"][s]["products"] for s in b["by"]}) == 1 and len(b["by"]) == len(order)
        for b in branches.values()
    )
    count_cols = ["products"] if same_counts else [f"products {s}" for s in order]
    header = ["level 1", "name"] + count_cols + [f"acc L3 {s}" for s in order]

    def size(item):
        return -max(x["products"] for x in item[1]["by"].values())

    rows = []
    for l1, b in sorted(branches.items(), key=lambda item: (size(item), item[0])):
        by = b["by"]
        if same_counts:
            counts = [str(next(iter(by.values()))["products"])]
        else:
            counts = [str(by[s]["products"]) if s in by else "0" for s in order]
        accs = [_fmt(by[s]["accuracy_l3"]) if s in by else "n/a" for s in order]
        rows.append([str(l1), b["name"].replace("|", "\\|")] + counts + accs)
    return header, rows


def _markdown(metrics: dict, histories: dict, run_id: str, files: dict) -> str:
    order = metrics.get("strategy_order") or list(metrics["strategies"])
    strategies = metrics["strategies"]
    lines = [f"# Evaluation of run `{run_id}`", ""]
    lines.append(
        "Validation split, scored per strategy. Accuracy at each level compares the predicted "
        "level-1/2/3 class with the true one; top-5 counts the true category among the five "
        "best candidates; hierarchical F1 (Kiritchenko et al.) gives partial credit for a "
        "correct ancestor (in this 3-level tree hP = hR = hF1)."
    )
    lines.append("")
    if not order:
        lines += ["No validation predictions for this run.", ""]
    else:
        rows = [[label] + [_fmt(strategies[s][key]) for s in order] for label, key in HEADLINE]
        rows.append(["products"] + [str(strategies[s]["products"]) for s in order])
        rows.append(["fallback (no image scored)"] + [str(strategies[s]["fallback"])
                                                       for s in order])
        rows.append(["excluded (no true label)"] + [str(strategies[s]["excluded_unlabeled"])
                                                     for s in order])
        lines += ["## Headline", ""] + _table(["metric"] + order, rows) + [""]
        lines += _recommendation_lines(metrics.get("recommendation"))

        header, rows = _branch_rows(metrics, order)
        lines += ["## Per-branch accuracy (level 3, by true level-1 branch)", ""]
        lines += _table(header, rows, ["---:", "---"] + ["---:"] * (len(header) - 2)) + [""]

        lines += ["## Level-1 confusion", "",
                  "Rows are the true level-1 class, normalized to sum 1.", ""]
        for s in order:
            name = storage.basename(files[f"confusion_l1_{s}"])
            lines += [f"### {s}", "", f"[{name}]({name})", "", f"![level-1 confusion, {s}]({name})",
                      ""]

    lines += _decision_lines(metrics, order, files)
    lines += _against_lines(metrics.get("against"), order)
    lines += ["## Training curves", ""]
    if histories:
        lines.append("Models: " + ", ".join(f"`{k}`" for k in histories) + ".")
        lines.append("")
    else:
        lines += ["No training history found for this run.", ""]
    name = storage.basename(files["training_curves"])
    lines += [f"[{name}]({name})", "", f"![training curves]({name})", ""]
    return "\n".join(lines)


def _against_lines(against: Optional[dict], order: List[str]) -> List[str]:
    """The release gate against an older run (hierarchy.evaluate.against)."""
    if not against:
        return []
    lines = [f"## Against run `{against['run_id']}` ({against['strategy']}, taxonomy "
             f"{against['taxonomy_version'][:19]})", "",
             "Negative flips: val products whose label both versions share, right under the old "
             "run and wrong under this one. Changed leaves: leaves new in this version or whose "
             f"products were relabelled ({len(against['changed_leaves'])}).", ""]
    rows = []
    for s in order:
        m = against["strategies"].get(s) or {}
        rows.append([s, str(m.get("products_compared", 0)), _pct(m.get("negative_flip_rate")),
                     _pct(m.get("positive_flip_rate")), _pct(m.get("old_accuracy_same_label")),
                     f"{_pct(m.get('changed_leaf_accuracy'))} "
                     f"({m.get('changed_leaf_products', 0)})"])
    return lines + _table(["strategy", "same-label products", "negative flips",
                           "positive flips", "old run right", "changed leaves (products)"],
                          rows) + [""]


def _recommendation_lines(chosen: Optional[dict]) -> List[str]:
    """Which strategy predict uses by default, why, and by how much (hierarchy.evaluate.choice)."""
    if not chosen or not chosen.get("recommended"):
        return []
    lines = ["## Recommended strategy", "",
             f"**{chosen['recommended']}**: {chosen['reason']}.", ""]
    if chosen.get("versus"):
        rows = [[s, _pct(chosen["accuracy_l3"].get(s)),
                 f"{100 * v['difference']:+.1f} [{100 * v['ci95'][0]:+.1f}, "
                 f"{100 * v['ci95'][1]:+.1f}]", str(v["products"])]
                for s, v in sorted(chosen["versus"].items(), key=lambda kv: kv[1]["difference"])]
        lines += _table(["candidate", "held-out level 3", f"{chosen['recommended']} minus it, "
                         "points [95% CI]", "products"], rows) + [""]
    return lines


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _decision_lines(metrics: dict, order: List[str], files: dict) -> List[str]:
    """The decisions section: per strategy, what the fitted rule files and how right it is."""
    fitted = [s for s in order if metrics["strategies"][s].get("decisions")]
    if not fitted:
        return []
    first = metrics["strategies"][fitted[0]]["decisions"]
    levels = ", ".join(map(str, first["levels"]))
    lines = ["## Decisions", "",
             f"Each product is filed at the deepest node (level {levels}) whose probability "
             f"clears the threshold, the rest go to review. The threshold is "
             f"certified on val's calibration part ({first['calibration_products']} products) "
             f"for precision {first['target']:g} at confidence {first['confidence']:g}; the "
             f"temperature is fitted on the other part ({first['fit_products']} products), "
             f"which also checks the threshold on products it never saw. A target needs at "
             f"least {first['needed_products']} filed calibration products even with no "
             f"error. A decision is right when its node is the true leaf or an ancestor. "
             f"The promise (decide.rule {first.get('rule', 'fixed-sequence')}): "
             f"{first.get('promise') or 'see README, Decisions'}, on products drawn like val.",
             ""]
    header = ["strategy", "threshold", "temperature", "filed", "leaf", "level 2", "level 1",
              "precision (calibration)", "precision (fit part)", "AURC",
              "ECE L3 before → after", "wrong leaves in the right L2 / L1"]
    rows = []
    for s in fitted:
        d = metrics["strategies"][s]["decisions"]
        cal, fit = d["calibration"], d["fit"]
        per = cal["per_level"]
        sev = d["severity"]
        ece3 = d["ece"]["3"]
        rows.append([
            s, "—" if d["threshold"] is None else f"{d['threshold']:.4g}", f"{d['temperature']:g}",
            _pct(cal["coverage"]), _pct(per["3"]["coverage"]), _pct(per["2"]["coverage"]),
            _pct(per["1"]["coverage"]), _pct(cal["precision"]), _pct(fit["precision"]),
            _fmt(d["aurc"]), f"{_fmt(ece3['before'])} → {_fmt(ece3['after'])}",
            f"{_pct(sev['same_level2'])} / {_pct(sev['same_level1'])}"])
    lines += _table(header, rows, ["---"] + ["---:"] * (len(header) - 1)) + [""]
    for s in fitted:
        d = metrics["strategies"][s]["decisions"]
        if d["threshold"] is None:
            lines += [f"- {s}: nothing is filed — {d['reason']}"]
    lines += (_every_rule_lines(metrics, fitted) + _support_lines(metrics, fitted)
              + _bigger_val_lines(metrics, fitted))
    if files.get("risk_coverage"):
        name = storage.basename(files["risk_coverage"])
        lines += ["", f"![risk-coverage on val]({name})", ""]
    return lines


def _every_rule_lines(metrics: dict, fitted: List[str]) -> List[str]:
    """Each declared rule on the same val, so a team sees what the other promise would file."""
    first = metrics["strategies"][fitted[0]]["decisions"].get("every_rule") or {}
    if not first:
        return []
    names = list(first)
    lines = ["", "### Every decision rule on the same val", "",
             "The share of the calibration part each `decide.rule` would file, and its "
             "precision there: " + "; ".join(f"`{n}`: {first[n]['promise']}" for n in names)
             + ".", ""]
    rows = []
    for s in fitted:
        got = metrics["strategies"][s]["decisions"].get("every_rule") or {}
        rows.append([s] + [f"{_pct(got[n]['coverage'])} at {_pct(got[n]['precision'])}"
                           if n in got and got[n]["threshold"] is not None else "nothing"
                           for n in names])
    return lines + _table(["strategy"] + names, rows, ["---"] + ["---:"] * len(names)) + [""]


def _support_lines(metrics: dict, fitted: List[str]) -> List[str]:
    """Realized precision on val by band of the true leaf's train products: where the promise,
    an average over val, is made of products the model knows well and where of the tail."""
    first = metrics["strategies"][fitted[0]]["decisions"].get("by_support") or []
    if not first:
        return []
    bands = [b["band"] for b in first]
    lines = ["", "### By train support of the true leaf", "",
             "Filed share and realized precision on all of val at each strategy's threshold, "
             "per band of the number of train products in the product's true leaf (its share "
             "of val in the header). Val drawn by product (`ingest.val_draw: product`) holds "
             "the tail at the rate new products do; the promise is over the mix, not per "
             "band.", ""]
    header = ["strategy"] + [f"{b} ({_pct(x['share'])})" for b, x in zip(bands, first)]
    rows = []
    for s in fitted:
        got = metrics["strategies"][s]["decisions"].get("by_support") or []
        rows.append([s] + [f"{_pct(b['coverage'])} at {_pct(b['precision'])}" for b in got])
    return lines + _table(header, rows, ["---"] + ["---:"] * len(bands)) + [""]


def _bigger_val_lines(metrics: dict, fitted: List[str]) -> List[str]:
    """What a bigger val would buy, per strategy and kind of promise."""
    lines = []
    for s in fitted:
        b = metrics["strategies"][s]["decisions"].get("bigger_val") or {}
        if not b.get("promises"):
            continue
        if not lines:
            lines = ["", "### What a bigger val would buy", "",
                     "A threshold fitted on all of val itself (as one fitted on test would be) "
                     "files the first share at the target; each promise needs the calibration "
                     "products named to certify it, and would certify the shares given with "
                     "2, 4, 10 and 100 times val's calibration products (in expectation, "
                     "val's precision at each threshold taken as the truth).", ""]
        for promise, p in b["promises"].items():
            need = p["needed_for_val_fitted"]
            needs = ("no val size (val is at the target there)" if need is None
                     else f"~{need:,} calibration products")
            grow = ", ".join(f"×{k}: {_pct(v)}" for k, v in p["coverage_at"].items())
            lines.append(f"- {s}, {promise}: files {_pct(b['val_fitted_coverage'])} at the "
                         f"target fitted on val; certifying that needs {needs} (now "
                         f"{b['calibration_products']}); {grow}")
    return lines + ([""] if lines else [])


def _training_summary(histories: dict) -> dict:
    out = {}
    for key, h in histories.items():
        epochs = len(h.get("loss") or [])
        out[key] = {
            "epochs": epochs,
            "last": {k: v[-1] for k, v in h.items() if isinstance(v, list) and v},
        }
    return out


def write_report(metrics: dict, histories: dict, output_dir: str, run_id: str) -> dict:
    """Write report.json, report.md, ``confusion_l1_<strategy>.png`` per strategy and
    training_curves.png into ``output_dir``; return ``{name: path}`` of everything written
    (keys ``report_json``, ``report_md``, ``confusion_l1_<strategy>``, ``training_curves``)."""
    order = metrics.get("strategy_order") or list(metrics["strategies"])
    files: Dict[str, str] = {}
    for s in order:
        conf = metrics["strategies"][s]["confusion_l1"]
        path = storage.join(output_dir, confusion_file(s))
        plot_confusion(conf["matrix"], conf["labels"], path,
                       f"Level-1 confusion — {s} (run {run_id})")
        files[f"confusion_l1_{s}"] = path
    decisions = {s: metrics["strategies"][s]["decisions"] for s in order
                 if metrics["strategies"][s].get("decisions")}
    if decisions:
        files["risk_coverage"] = plot_risk_coverage(
            decisions, storage.join(output_dir, "risk_coverage.png"),
            f"Hierarchical risk-coverage on val (run {run_id})")
    files["training_curves"] = plot_training_curves(
        histories, storage.join(output_dir, "training_curves.png")
    )

    files["report_md"] = storage.join(output_dir, "report.md")
    files["report_json"] = storage.join(output_dir, "report.json")
    doc = {
        "run_id": run_id,
        "split": "val",
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **metrics,
        "training": _training_summary(histories),
        "files": {k: storage.basename(v) for k, v in files.items()},
    }
    storage.write_text_atomic(files["report_json"],
                              json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    storage.write_text_atomic(files["report_md"], _markdown(metrics, histories, run_id, files))
    return files
