"""Unlearning on the label-noise testbed: every method side by side, against retraining.

Flags the testbed's noisy ids, runs each unlearning method on the trained model, and compares it
with the reference measured in the same run: a model retrained from scratch without the flagged
ids (the gold standard). Also measures example-tied dropout's overhead: the training step time
with and without it, and its memory for 1M example ids.

    .venv/bin/python benchmarks/bench_unlearn.py --testbed /tmp/tb30

Prints a rich table and writes ``benchmarks/results/unlearn.json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memaudit import load_dataset, load_model, read_ids
from memaudit.dropout import bind_ids, dropout_layers, insert_dropout
from memaudit.models import Classifier
from memaudit.schema import UnlearnScores
from memaudit.schema._unlearn import accuracy_gap
from memaudit.unlearn import METHODS, fresh_copy, unlearn

console = Console(stderr=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def step_times(model: Classifier, data: Any, *, steps: int, batch: int) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, SGD) without and with example-tied dropout.

    The two nets take turns on the same batches, so a load change on a shared machine hits both.
    """
    plain, tied = fresh_copy(model).train(), fresh_copy(model).train()
    insert_dropout(tied)
    binding = bind_ids(tied)
    nets = {"plain": (plain, None), "etd": (tied, binding)}
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, (n, _) in nets.items()}
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"plain": [], "etd": []}
    for k in range(steps + 2):  # two warm-up steps
        ids = torch.randperm(len(data), generator=gen)[:batch]
        x, y = data.batch(ids), data.labels[ids]
        for name, (net, bound) in nets.items():
            start = time.perf_counter()
            if bound is not None:
                bound.set(ids)
            loss = F.cross_entropy(net(x), y)
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if k >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def etd_memory(model: Classifier, data: Any, *, n_ids: int, batch: int) -> dict[str, float]:
    """Memory of example-tied dropout for ``n_ids`` examples, against the paper's dense table."""
    net = copy.deepcopy(model)
    insert_dropout(net)
    layers = dropout_layers(net)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [  # measurement only, removed below: the layers' output shapes for the dense table
        etd.register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape[1:])))
        for name, etd in layers.items()
    ]
    try:
        net.eval()(data.batch(torch.arange(2)))
    finally:
        for handle in handles:
            handle.remove()
    state = sum(
        t.numel() * t.element_size() for e in layers.values() for t in e.state_dict().values()
    )
    rss0 = _rss_mb()
    start = time.perf_counter()
    for ids in torch.arange(n_ids).split(batch):
        for name, etd in layers.items():
            etd.masks(ids, shapes[name][0])
    seconds = time.perf_counter() - start
    dense = n_ids * sum(torch.Size(s).numel() for s in shapes.values())  # bool table bytes
    per_batch = batch * sum(s[0] for s in shapes.values()) * 4
    return {
        "n_ids": n_ids,
        "layers": len(layers),
        "state_bytes": state,
        "rss_growth_mb": round(_rss_mb() - rss0, 2),
        "mask_bytes_per_batch": per_batch,
        "mask_seconds_all_ids": round(seconds, 3),
        "dense_table_mb_paper": round(dense / 2**20, 1),
    }


def measure_overhead(model: Classifier, data: Any, *, steps: int) -> dict[str, Any]:
    console.print("example-tied dropout overhead ...")
    times = step_times(model, data, steps=steps, batch=128)
    plain, tied = statistics.median(times["plain"]), statistics.median(times["etd"])
    return {
        "step_seconds_plain": round(plain, 4),
        "step_seconds_etd": round(tied, 4),
        "ratio": round(tied / plain, 3),
        "steps": steps,
        "memory_1k_ids": etd_memory(model, data, n_ids=1_000, batch=1024),
        "memory_1m_ids": etd_memory(model, data, n_ids=1_000_000, batch=1024),
    }


def print_overhead(overhead: dict[str, Any]) -> None:
    mem = overhead["memory_1m_ids"]
    Console().print(
        f"ETD training step {overhead['step_seconds_etd'] * 1e3:.1f} ms vs "
        f"{overhead['step_seconds_plain'] * 1e3:.1f} ms plain (x{overhead['ratio']}); "
        f"1M ids: state {mem['state_bytes']} B, RSS +{mem['rss_growth_mb']} MB "
        f"(the paper's dense mask table: {mem['dense_table_mb_paper']} MB)"
    )


def _row(
    name: str,
    scores: UnlearnScores,
    seconds: float | None,
    ref: UnlearnScores | None,
    ref_seconds: float | None,
) -> dict[str, Any]:
    return {
        "method": name,
        **scores.model_dump(),
        "seconds": None if seconds is None else round(seconds, 2),
        "time_vs_retrain": None
        if seconds is None or not ref_seconds
        else round(seconds / ref_seconds, 3),
        "gap_to_retrain": None if ref is None else round(accuracy_gap(scores, ref), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--testbed", default="/tmp/tb30")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "retrain"))
    parser.add_argument("--retrain-epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-variants", action="store_true", help="skip the tie-all ETD row")
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the ETD overhead (step time, memory), into the etd_overhead of --out",
    )
    parser.add_argument("--out", default="benchmarks/results/unlearn.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tb = Path(args.testbed)
    model = load_model(tb / "model.safetensors")
    train = load_dataset(tb / "data.npz", split="train", model=model)
    test = load_dataset(tb / "data.npz", split="test", model=model)
    flagged = train.rows(read_ids(tb / "noisy_ids.txt"))

    out = Path(args.out)
    if args.overhead_only:
        overhead = measure_overhead(model, train, steps=args.steps)
        print_overhead(overhead)
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**saved, "etd_overhead": overhead}, indent=2))
        console.print(f"updated etd_overhead in {out}")
        return
    rows: list[dict[str, Any]] = []
    reports: dict[str, Any] = {}
    console.print("retraining from scratch without the flagged ids (reference) ...")
    gold = unlearn(
        model, train, flagged, test=test, method="retrain", epochs=args.retrain_epochs, device="cpu"
    )
    ref, ref_s = gold.report.after, gold.report.seconds
    rows.append(_row("original model", gold.report.before, None, ref, ref_s))
    rows.append(_row("retrain", ref, ref_s, ref, ref_s))
    reports["retrain"] = json.loads(gold.report.model_dump_json())
    runs: list[tuple[str, str, dict[str, Any] | None]] = [
        (m, m, None) for m in args.methods.split(",") if m
    ]
    if not args.no_variants and "example-tied-dropout" in args.methods:
        # the paper's training-time recipe as an unlearning step: every row tied, p_gen 0.2
        runs.append(
            (
                "example-tied-dropout [tie all, p_gen 0.2]",
                "example-tied-dropout",
                {"tie": "all", "p_gen": 0.2},
            )
        )
    for label, method, options in runs:
        console.print(f"unlearning with {escape(label)} ...")
        result = unlearn(
            model, train, flagged, test=test, method=method, options=options, device="cpu"
        )
        rows.append(_row(label, result.report.after, result.report.seconds, ref, ref_s))
        reports[label] = json.loads(result.report.model_dump_json())

    overhead = measure_overhead(model, train, steps=args.steps)

    table = Table(title=f"unlearning {len(flagged)} flagged ids ({tb})")
    for col in (
        "method",
        "flagged acc",
        "retained acc",
        "test acc",
        "MIA AUC",
        "seconds",
        "vs retrain time",
        "gap to retrain",
    ):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(escape(r["method"]), escape(r["error"][:60]), *[""] * 6)
            continue
        table.add_row(
            escape(r["method"]),
            f"{r['flagged_accuracy']:.1%}",
            f"{r['retained_accuracy']:.1%}",
            f"{r['test_accuracy']:.1%}",
            f"{r['mia_auc']:.3f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "-" if r["time_vs_retrain"] is None else f"{r['time_vs_retrain']:.0%}",
            f"{r['gap_to_retrain']:.1%}",
        )
    Console().print(table)
    print_overhead(overhead)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "testbed": str(tb),
                "n_flagged": len(flagged),
                "threads": args.threads,
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "rows": rows,
                "etd_overhead": overhead,
                "reports": reports,
            },
            indent=2,
        )
    )
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
