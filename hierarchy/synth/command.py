"""``hierarchy synth``: a synthetic catalog in the exact Cdiscount format."""

from __future__ import annotations

import json

from hierarchy.arguments import Command, common, count
from hierarchy.contracts.errors import UsageError
from hierarchy.contracts.settings import Settings


def _arguments(p) -> None:
    p.add_argument("--output", metavar="DIR", help="default paths.synth")
    p.add_argument("--products", type=count(1), help="train products (default synth.products)")
    p.add_argument("--test-products", type=count(0),
                   help="test products (default synth.test_products)")
    p.add_argument("--seed", type=count(0), help="random seed (default synth.seed)")
    p.add_argument("--taxonomy", help="small (4/12/40), hard (6/18/108), full (49/483/5270) "
                                      "or a category_names.csv (default: the preset's)")
    p.add_argument("--preset", choices=("fast", "hard", "tangled"),
                   help="fast: learnt in seconds (the demo); hard: confusable siblings, long "
                        "tail, noisy labels, filler views, clutter; tangled: hard, with "
                        "look-alike leaves in different branches (default synth.preset)")
    common(p)


def _given(value, default):
    return value if value is not None else default


def run(args, cfg: Settings) -> dict:
    from hierarchy.synth import generate
    from hierarchy.synth.plant import Plants

    scfg = cfg.synth
    plants = Plants.from_config(scfg.plant)
    if sum(plants.shares(True)) > 1:
        raise UsageError(f"synth.plant: the shares sum to {sum(plants.shares(True)):.2f}; at "
                         f"most 1 (one plant per product)")
    stats = generate(
        args.output,
        products=_given(args.products, scfg.products),
        seed=_given(args.seed, scfg.seed),
        taxonomy=args.taxonomy or scfg.taxonomy or None,
        preset=args.preset or scfg.preset,
        test_products=_given(args.test_products, scfg.test_products),
        workers=scfg.workers or None,
        progress=cfg.ingest.progress,
        plants=plants,
    )
    print(json.dumps(stats, indent=2, default=str))
    return {"output": args.output}


COMMANDS = (Command(
    "synth", help="write a synthetic catalog in the Cdiscount format",
    description="Write DIR/train.bson, DIR/test.bson and DIR/category_names.csv in the exact "
                "Cdiscount format.",
    add_arguments=_arguments, run=run, paths={"output": "synth"}),)
