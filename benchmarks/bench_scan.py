"""Benchmark: memaudit's batched scan vs the authors' sequential search, on the testbed.

Flags N noisy (memorized) and N clean training examples, scans each group with ``Auditor.scan``
(search + pruning + after-edit accuracy), times the bare batched search (no pruning, no
evaluation) and the faithful sequential reference on the same examples, and reports flip rates,
units-to-flip, collateral accuracy drops, layers, speed-up and per-example agreement.

    python benchmarks/bench_scan.py --testbed memaudit-demo/testbed --n 50
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from memaudit import Auditor, ScanSettings, load_dataset, load_model, read_ids
from memaudit.auditor import _complement, _sample
from memaudit.localize import greedy_search, reference_gradient
from memaudit.masks import UnitMasks
from memaudit.testbed import build_testbed, load_testbed, pick_device

sys.path.insert(0, str(Path(__file__).parent))
from reference_sequential import sequential_flip


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="memaudit-demo/testbed", type=Path)
    parser.add_argument("--n", type=int, default=50, help="examples per group")
    parser.add_argument("--max-units", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reference-mode", choices=["shared", "exact"], default="shared")
    parser.add_argument("--groups", default="noisy,clean", help="comma-separated: noisy, clean")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scan.json"))
    args = parser.parse_args()
    console = Console(stderr=True)
    device = pick_device(args.device)

    if load_testbed(args.testbed) is None:
        console.print(f"building the testbed in {args.testbed} ...")
        build_testbed(args.testbed, device=device)
    model = load_model(args.testbed / "model.safetensors")
    train = load_dataset(args.testbed / "data.npz", split="train", model=model)
    test = load_dataset(args.testbed / "data.npz", split="test", model=model)
    noisy_all = read_ids(args.testbed / "noisy_ids.txt")
    noisy_set = set(noisy_all)
    gen = torch.Generator().manual_seed(0)
    clean_pool = [
        i for i in torch.randperm(len(train), generator=gen).tolist() if i not in noisy_set
    ]
    groups = {"noisy": noisy_all[: args.n], "clean": clean_pool[: args.n]}
    settings = ScanSettings(
        max_units=args.max_units,
        reference_size=args.reference_size,
        batch_size=args.batch_size,
        reference_mode=args.reference_mode,
    )
    groups = {k: v for k, v in groups.items() if k in args.groups.split(",")}
    auditor = Auditor(model, train, test, device=device)
    model = auditor.model.to(device).eval()
    space = model.units()

    results: dict[str, Any] = {
        "settings": settings.model_dump(),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "groups": {},
    }
    for name, ids in groups.items():
        report = auditor.scan(ids, settings=settings)
        flagged_rows = train.rows(ids)
        # The reference and test rows Auditor.scan draws: two draws of its seeded generator.
        draw = torch.Generator().manual_seed(settings.seed)
        ref_rows = _sample(_complement(len(train), flagged_rows), settings.reference_size, draw)
        test_rows = _sample(torch.arange(len(test)), settings.eval_size, draw)

        # The bare batched search (greedy only), timed like the reference.
        start = time.perf_counter()
        batched_units: list[list[int]] = []
        with UnitMasks(model.net, space) as masks:
            ref_grad = reference_gradient(model, masks, train, ref_rows, device=device)
            exact = (train.batch(ref_rows, device), train.labels[ref_rows].to(device))
            ref_batch = exact if args.reference_mode == "exact" else None
            for chunk in flagged_rows.split(args.batch_size):
                x, y = train.batch(chunk, device), train.labels[chunk].to(device)
                found = greedy_search(
                    model,
                    masks,
                    x,
                    y,
                    settings=settings,
                    reference_grad=ref_grad,
                    generator=torch.Generator().manual_seed(0),
                    reference_batch=ref_batch,
                )
                batched_units += [f.greedy if f.status.value == "flipped" else [] for f in found]
        batched_seconds = time.perf_counter() - start

        start = time.perf_counter()
        seq = [
            sequential_flip(
                model,
                train,
                int(r),
                ref_rows,
                max_units=args.max_units,
                device=device,
                test=test,
                test_rows=test_rows,
            )
            for r in flagged_rows.tolist()
        ]
        seq_seconds = time.perf_counter() - start
        seq_search = seq_seconds - sum(s.eval_seconds for s in seq)

        searched = [e for e in report.examples if e.status.value != "misclassified"]
        both = [
            (len(b), len(s.units))
            for e, b, s in zip(report.examples, batched_units, seq, strict=True)
            if e.status.value == "flipped" and s.flipped
        ]
        same_first = [
            bool(b and s.units and b[0] == s.units[0])
            for b, s in zip(batched_units, seq, strict=True)
        ]
        summary = report.summary
        results["groups"][name] = {
            "n": len(ids),
            "flip_rate": summary.flip_rate,
            "median_units_greedy": summary.median_units,
            "mean_units_greedy": summary.mean_units,
            "median_units_minimal": summary.median_units_minimal,
            "mean_units_minimal": summary.mean_units_minimal,
            "reference_accuracy_drop": summary.mean_reference_accuracy_drop,
            "test_accuracy_drop": summary.mean_test_accuracy_drop,
            "units_per_layer": {c.layer: c.count for c in summary.units_per_layer},
            "depth_deciles": summary.depth_deciles,
            "scan_seconds": report.timing.seconds,
            "batched_search_seconds": batched_seconds,
            "sequential_seconds": seq_seconds,
            "speedup_search_only": seq_search / batched_seconds,
            "speedup_full": seq_seconds / report.timing.seconds,
            "sequential_flip_rate": sum(s.flipped for s in seq) / max(1, len(searched)),
            "sequential_median_units": _median([len(s.units) for s in seq if s.flipped]),
            "sequential_mean_units": _mean([float(len(s.units)) for s in seq if s.flipped]),
            "agreement_same_count": _mean([float(a == b) for a, b in both]),
            "agreement_within_1": _mean([float(abs(a - b) <= 1) for a, b in both]),
            "mean_abs_count_difference": _mean([float(abs(a - b)) for a, b in both]),
            "same_first_unit": _mean([float(v) for v in same_first]),
        }
    g = results["groups"]
    results["ratio_median_units_clean_over_noisy"] = _ratio(
        g["clean"]["median_units_minimal"], g["noisy"]["median_units_minimal"]
    )
    results["ratio_mean_units_clean_over_noisy"] = _ratio(
        g["clean"]["mean_units_minimal"], g["noisy"]["mean_units_minimal"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    Console().print(_table(results))
    console.print(f"written to {args.out}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(results: dict[str, Any]) -> Table:
    table = Table(title=f"scan benchmark ({results['device']}, {results['threads']} threads)")
    table.add_column("metric")
    for name in results["groups"]:
        table.add_column(name, justify="right")

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    keys = [
        "n",
        "flip_rate",
        "median_units_greedy",
        "mean_units_greedy",
        "median_units_minimal",
        "mean_units_minimal",
        "reference_accuracy_drop",
        "test_accuracy_drop",
        "scan_seconds",
        "batched_search_seconds",
        "sequential_seconds",
        "speedup_search_only",
        "speedup_full",
        "sequential_flip_rate",
        "sequential_median_units",
        "sequential_mean_units",
        "agreement_same_count",
        "agreement_within_1",
        "mean_abs_count_difference",
        "same_first_unit",
    ]
    for key in keys:
        table.add_row(key, *(fmt(g[key]) for g in results["groups"].values()))
    median = fmt(results["ratio_median_units_clean_over_noisy"])
    mean = fmt(results["ratio_mean_units_clean_over_noisy"])
    table.caption = f"clean/noisy units (minimal): median x{median}, mean x{mean}"
    return table


if __name__ == "__main__":
    main()
