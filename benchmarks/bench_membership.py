"""Benchmark: does the membership test see memorization? Like with like, on the testbed.

Trains ``--references`` models from scratch without the flagged ids (the testbed's recipe, other
seeds) and one more as a retrained target, then runs :func:`memaudit.membership.attack` on the
flagged ids for the original model (which memorized them) and for the retrained one (which never
saw them). Prints AUC and TPR at 1% / 0.1% FPR with bootstrap intervals, and the former
loss-threshold AUC (flagged ids against test images) for comparison; writes JSON.

    python benchmarks/bench_membership.py --testbed /tmp/demo/testbed --references 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from memaudit import load_dataset, load_model, read_ids
from memaudit.data import complement
from memaudit.engine import evaluate, fit
from memaudit.membership import AttackResult, attack
from memaudit.unlearn import fresh_copy, mia_auc


def _retrained(model: Any, train: Any, rows: torch.Tensor, *, epochs: int, seed: int) -> Any:
    torch.manual_seed(seed)  # a new initialization per reference
    fresh = fresh_copy(model)
    return fit(fresh, train, rows, epochs=epochs, seed=seed, device="cpu")


def _row(name: str, found: AttackResult, loss_auc: float) -> dict[str, Any]:
    return {
        "model": name,
        "auc": [found.auc.value, found.auc.low, found.auc.high],
        "tpr_1pct": [found.tpr[0.01].value, found.tpr[0.01].low, found.tpr[0.01].high],
        "tpr_0.1pct": [found.tpr[0.001].value, found.tpr[0.001].low, found.tpr[0.001].high],
        "loss_threshold_auc_vs_test": loss_auc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=Path("memaudit-demo/testbed"))
    parser.add_argument("--flagged", type=Path, default=None, help="default: the noisy ids")
    parser.add_argument("--references", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/membership.json"))
    args = parser.parse_args()
    console = Console(stderr=True)
    model = load_model(args.testbed / "model.safetensors")
    train = load_dataset(args.testbed / "data.npz", split="train", model=model)
    test = load_dataset(args.testbed / "data.npz", split="test", model=model)
    ids = read_ids(args.flagged or args.testbed / "noisy_ids.txt")
    rows = train.rows(ids)
    keep = complement(len(train), rows)
    start = time.perf_counter()
    models = []
    for k in range(args.references + 1):
        console.print(f"training model {k + 1} of {args.references + 1} without the flagged ids")
        models.append(_retrained(model, train, keep, epochs=args.epochs, seed=100 + k))
    seconds = time.perf_counter() - start
    retrained, references = models[0], models[1:]
    found = attack({"original": model, "retrained": retrained}, references, train, rows)
    rows_out = []
    for name, m in (("original", model), ("retrained", retrained)):
        flag = evaluate(m, train, rows, device="cpu")
        tst = evaluate(m, test, torch.arange(len(test)), device="cpu")
        rows_out.append(_row(name, found[name], mia_auc(flag.loss, tst.loss)))
    table = Table(title=f"membership test: {len(ids)} flagged ids, {args.references} references")
    for col in ("model", "AUC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "loss AUC vs test (old)"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def fmt(v: list[float]) -> str:
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    for r in rows_out:
        table.add_row(
            r["model"],
            fmt(r["auc"]),
            fmt(r["tpr_1pct"]),
            fmt(r["tpr_0.1pct"]),
            f"{r['loss_threshold_auc_vs_test']:.3f}",
        )
    Console().print(table)
    out = {
        "testbed": str(args.testbed),
        "n_flagged": len(ids),
        "references": args.references,
        "epochs": args.epochs,
        "training_seconds": seconds,
        "rows": rows_out,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
