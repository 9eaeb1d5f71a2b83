"""Unlearning methods over their own randomness: several method seeds on one yardstick.

``bench_unlearn.py`` draws a new forget set, retraining and references for every seed, so its
spread mixes the ids, the yardstick and the method. Here the ids and the yardstick (the
retrained model and membership references of ``bench_unlearn.py``'s ``--cache``, built there or
here) stay those of one ``--seed``, and only the method's seed changes: the spread is the
method's own, and two variants of a method are compared on the same draws.

    .venv/bin/python benchmarks/bench_unlearn_seeds.py --testbed memaudit-demo/testbed \\
        --forget mislabeled-part,random-10 --method-seeds 10,11,12 --budget 0.17 \\
        --methods example-tied-dropout,example-tied-dropout:hold_weight=0

Prints a table per kind (mean ± sd over the method seeds) and writes
``benchmarks/results/unlearn_seeds.json`` after every method seed; ``--resume`` keeps the runs
there.
Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from bench_unlearn import (  # beside this file, on the path of a script run
    console,
    print_tables,
    resumable,
    run_one,
    summarize_runs,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--testbed", default="memaudit-demo/testbed")
    parser.add_argument("--forget", required=True, help="comma-separated forget kinds")
    parser.add_argument("--seed", type=int, default=0, help="the ids' and yardstick's seed")
    parser.add_argument("--method-seeds", default="10,11,12")
    parser.add_argument(
        "--methods",
        default="example-tied-dropout",
        help="comma-separated; NAME:KEY=VALUE:... runs a method with those options",
    )
    parser.add_argument("--budget", type=float)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/memaudit-bench-unlearn", help="yardsticks")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/unlearn_seeds.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    saved = json.loads(out.read_text()) if args.resume and out.exists() else {}
    entries = [m for m in args.methods.split(",") if m]
    resumable(saved, out, seed=args.seed, budget=args.budget, threads=args.threads)
    runs: dict[str, Any] = saved.get("runs", {})
    method_seeds = [int(s) for s in args.method_seeds.split(",")]

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "command": " ".join(sys.argv),
            "seed": args.seed,
            "budget": args.budget,
            "threads": args.threads,
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            },
            "runs": runs,
        }
        out.write_text(json.dumps(doc, indent=1))

    for kind in [k for k in args.forget.split(",") if k]:
        console.print(f"{kind}, ids and yardstick of seed {args.seed}:")
        done = runs.setdefault(kind, {})
        for ms in method_seeds:
            if str(ms) in done:
                continue
            console.print(f" method seed {ms}:")
            done[str(ms)] = run_one(
                Path(args.testbed),
                kind,
                args.seed,
                entries,
                Path(args.cache),
                None,
                args.budget,
                method_seed=ms,
            )
            save()
    print_tables(summarize_runs(runs), {k: len(v) for k, v in runs.items()}, args.markdown)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
