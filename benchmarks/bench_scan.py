"""Benchmark: memaudit's batched scan vs the authors' sequential search, on the testbed.

Flags N noisy (memorized) and N clean training examples, scans each group with ``Auditor.scan``
(search + pruning + after-edit accuracy), times the bare batched search (no pruning, no
evaluation) and the faithful sequential reference on the same examples, and reports flip rates,
units-to-flip, collateral accuracy drops, layers, speed-up and per-example agreement.

    python benchmarks/bench_scan.py --testbed memaudit-demo/testbed --n 50 --modes shared,exact

Each reference mode is compared against the same sequential run. The batched search runs
channels-last, as the scan does; the reference runs in PyTorch's default layout, as the
authors' code does, or with ``--reference-channels-last`` channels-last too.
``--precisions float32,mixed`` runs every mode at each precision, and each variant
reports the share of examples whose greedy units are those of the first variant, unit for unit.
``--noise-floor`` runs the sequential reference a second time with another draw of reference
rows: how far two runs of the authors' own procedure agree is the floor under any agreement
figure. ``--draws K`` repeats the whole comparison on K draws of reference rows (scan seeds
0..K-1, the reference on the same rows as the scan each time) and reports each draw's medians
and the medians of all draws pooled: one draw's median of examples that need many units moves
with the rows drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
from memaudit.data import ImageDataset, complement, sample
from memaudit.engine import channels_last, pick_device
from memaudit.localize import Reference, greedy_search, reference_gradient, resolved
from memaudit.masks import UnitMasks
from memaudit.models import Classifier
from memaudit.schema import ScanReport
from memaudit.testbed import build_testbed, load_testbed

sys.path.insert(0, str(Path(__file__).parent))
from reference_sequential import SequentialResult, sequential_flip


def _median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="memaudit-demo/testbed", type=Path)
    parser.add_argument("--n", type=int, default=50, help="examples per group")
    parser.add_argument(
        "--skip", type=int, default=0, help="skip this many examples of each group (held-out runs)"
    )
    parser.add_argument("--max-units", type=int, default=64)
    parser.add_argument("--reference-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shared-units", type=int, default=ScanSettings().shared_units)
    parser.add_argument(
        "--modes", default="shared", help="comma-separated: shared, refreshed, exact"
    )
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma-separated ScanSettings.precision values, each run with every mode "
        "(auto: mixed where the device has native bfloat16, else float32)",
    )
    parser.add_argument(
        "--noise-floor", action="store_true", help="rerun the reference on other reference rows"
    )
    parser.add_argument(
        "--reference-channels-last",
        action="store_true",
        help="run the sequential reference channels-last too, as memaudit's scan runs",
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=1,
        help="repeat with this many draws of reference rows (scan seeds seed, seed+1, ...), "
        "the reference on the same rows each time; the group's 'draws' holds each draw's "
        "medians and the medians pooled over draws",
    )
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
    picked = slice(args.skip, args.skip + args.n)
    groups = {"noisy": noisy_all[picked], "clean": clean_pool[picked]}
    groups = {k: v for k, v in groups.items() if k in args.groups.split(",")}
    precisions = args.precisions.split(",")
    variants = {
        mode if len(precisions) == 1 else f"{mode}:{precision}": resolved(
            ScanSettings(
                max_units=args.max_units,
                reference_size=args.reference_size,
                batch_size=args.batch_size,
                reference_mode=mode,
                shared_units=args.shared_units,
                precision=precision,
            ),
            device,
        )
        for mode in args.modes.split(",")
        for precision in precisions
    }
    auditor = Auditor(model, train, test, device=device)
    model = auditor.model.to(device).eval()

    results: dict[str, Any] = {
        "settings": next(iter(variants.values())).model_dump(
            exclude={"reference_mode", "precision"}
        ),
        "precisions": {name: v.precision for name, v in variants.items()},
        "modes": list(variants),
        "skip": args.skip,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reference_channels_last": args.reference_channels_last,
        "machine": platform.processor() or platform.machine(),
        "groups": {},
    }
    for name, ids in groups.items():
        runs = []
        for k in range(args.draws):
            seeded = {m: v.model_copy(update={"seed": v.seed + k}) for m, v in variants.items()}
            runs.append(
                _group(
                    name,
                    ids,
                    seeded,
                    model,
                    train,
                    test,
                    auditor,
                    args,
                    device,
                    console,
                    noise_floor=args.noise_floor and k == 0,
                )
            )
        results["groups"][name] = runs[0]
        if args.draws > 1:  # each later draw's figures, per example too, under "others"
            runs[0]["draws"] = {**_draws(runs), "others": runs[1:]}
    g = results["groups"]
    if {"noisy", "clean"} <= g.keys():
        for mode in variants:
            noisy, clean = g["noisy"]["modes"][mode], g["clean"]["modes"][mode]
            for stat in ("median", "mean"):
                units = f"{stat}_units_minimal"
                clean[f"ratio_{stat}_units_clean_over_noisy"] = _ratio(clean[units], noisy[units])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    Console(width=200).print(_table(results))
    console.print(f"written to {args.out}")


def _group(
    name: str,
    ids: list[int],
    variants: dict[str, ScanSettings],
    model: Classifier,
    train: ImageDataset,
    test: ImageDataset,
    auditor: Auditor,
    args: argparse.Namespace,
    device: torch.device,
    console: Console,
    *,
    noise_floor: bool,
) -> dict[str, Any]:
    """One group of ids, on the reference rows of the variants' seed: the sequential reference,
    then every variant against it."""
    flagged_rows = train.rows(ids)
    settings = next(iter(variants.values()))
    # The reference and test rows Auditor.scan draws: two draws of its seeded generator.
    draw = torch.Generator().manual_seed(settings.seed)
    ref_rows = sample(complement(len(train), flagged_rows), settings.reference_size, draw)
    test_rows = sample(torch.arange(len(test)), settings.eval_size, draw)

    sequential = functools.partial(
        _sequential,
        model,
        train,
        flagged_rows,
        test=test,
        test_rows=test_rows,
        max_units=args.max_units,
        device=device,
    )
    console.print(f"{name}: sequential reference ...")
    start = time.perf_counter()
    with channels_last(model) if args.reference_channels_last else contextlib.nullcontext():
        seq = sequential(ref_rows)
    seq_seconds = time.perf_counter() - start
    seq_search = seq_seconds - sum(s.eval_seconds for s in seq)
    group: dict[str, Any] = {
        "n": len(ids),
        "seed": settings.seed,
        "sequential_seconds": seq_seconds,
        "sequential_search_seconds": seq_search,
        "sequential_flip_rate": sum(s.flipped for s in seq) / max(1, len(seq)),
        "sequential_median_units": _median([len(s.units) for s in seq if s.flipped]),
        "sequential_mean_units": _mean([float(len(s.units)) for s in seq if s.flipped]),
        # per example, in order ([]: did not flip): to compare later variants offline
        "sequential_units": [s.units if s.flipped else [] for s in seq],
        "modes": {},
    }
    if noise_floor:
        console.print(f"{name}: sequential reference on other reference rows ...")
        other = sample(
            complement(len(train), flagged_rows),
            settings.reference_size,
            torch.Generator().manual_seed(settings.seed + 1),
        )
        again = sequential(other)
        group["noise_floor"] = {
            "sequential_median_units": _median([len(s.units) for s in again if s.flipped]),
            **_agreement([s.units if s.flipped else [] for s in again], seq),
        }
    first: list[list[int]] | None = None
    for mode, variant in variants.items():
        console.print(f"{name}: {mode} ...")
        report = auditor.scan(ids, settings=variant)
        batched_units, batched_seconds = _bare_search(
            model, train, flagged_rows, ref_rows, variant, device
        )
        group["modes"][mode] = _compare(
            report, batched_units, batched_seconds, seq, seq_seconds, seq_search
        )
        first = first or batched_units
        group["modes"][mode]["same_units_as_first_variant"] = _mean(
            [float(a == b) for a, b in zip(batched_units, first, strict=True)]
        )
        group["modes"][mode]["greedy_units"] = batched_units  # as sequential_units
    return group


def _draws(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A group over draws of reference rows (the scan's seed and the reference's rows move
    together): each draw's medians, and the medians of all draws' counts pooled."""

    def counts(units: list[list[int]]) -> list[int]:
        return [len(u) for u in units if u]

    modes = list(runs[0]["modes"])
    lists = {"sequential_median_units": [counts(r["sequential_units"]) for r in runs]}
    lists |= {m: [counts(r["modes"][m]["greedy_units"]) for r in runs] for m in modes}
    per_draw = [{k: _median(v[d]) for k, v in lists.items()} for d in range(len(runs))]
    pooled: dict[str, Any] = {k: _median([c for draw in v for c in draw]) for k, v in lists.items()}
    for m in modes:
        seconds = [
            (r["sequential_search_seconds"], r["modes"][m]["batched_search_seconds"]) for r in runs
        ]
        pooled[f"{m}_speedup_search_only"] = sum(a for a, _ in seconds) / sum(b for _, b in seconds)
        pooled[f"{m}_draws_within_1"] = sum(
            abs(d[m] - d["sequential_median_units"]) <= 1
            for d in per_draw
            if d[m] is not None and d["sequential_median_units"] is not None
        )
    pooled["n_draws"] = len(runs)
    return {"seeds": [r["seed"] for r in runs], "per_draw": per_draw, "pooled": pooled}


def _sequential(
    model: Classifier,
    train: ImageDataset,
    flagged_rows: torch.Tensor,
    reference: torch.Tensor,
    *,
    test: ImageDataset,
    test_rows: torch.Tensor,
    max_units: int,
    device: torch.device,
) -> list[SequentialResult]:
    """The faithful sequential reference, one flagged row after the other."""
    return [
        sequential_flip(
            model,
            train,
            int(r),
            reference,
            max_units=max_units,
            device=device,
            test=test,
            test_rows=test_rows,
        )
        for r in flagged_rows.tolist()
    ]


def _bare_search(
    model: Classifier,
    train: ImageDataset,
    flagged_rows: torch.Tensor,
    ref_rows: torch.Tensor,
    settings: ScanSettings,
    device: torch.device,
) -> tuple[list[list[int]], float]:
    """The greedy search alone (no pruning, no evaluation), timed like the reference."""
    start = time.perf_counter()
    units: list[list[int]] = []
    with UnitMasks(model.net, model.units()) as masks, channels_last(model):  # as the scan runs
        ref_grad = reference_gradient(model, masks, train, ref_rows, device=device)
        exact = Reference(train.batch(ref_rows, device), train.labels[ref_rows].to(device))
        reference = exact if settings.reference_mode != "shared" else None
        for chunk in flagged_rows.split(settings.batch_size):
            x, y = train.batch(chunk, device), train.labels[chunk].to(device)
            found = greedy_search(
                model,
                masks,
                x,
                y,
                settings=settings,
                reference_grad=ref_grad,
                ids=torch.tensor(train.ids_of(chunk)),
                reference=reference,
            )
            units += [f.greedy if f.status.value == "flipped" else [] for f in found]
    return units, time.perf_counter() - start


def _compare(
    report: ScanReport,
    batched_units: list[list[int]],
    batched_seconds: float,
    seq: list[SequentialResult],
    seq_seconds: float,
    seq_search: float,
) -> dict[str, Any]:
    """One mode's scan, measured and compared with the sequential reference."""
    summary = report.summary
    return {
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
        "sequential_search_seconds": seq_search,
        "speedup_search_only": seq_search / batched_seconds,
        "speedup_full": seq_seconds / report.timing.seconds,
        **_agreement(batched_units, seq),
    }


def _agreement(units: list[list[int]], seq: list[SequentialResult]) -> dict[str, Any]:
    """How greedy unit lists (``[]``: did not flip) agree with the reference's, per example."""
    both = [(len(u), len(s.units)) for u, s in zip(units, seq, strict=True) if u and s.flipped]
    return {
        "agreement_same_count": _mean([float(a == b) for a, b in both]),
        "agreement_within_1": _mean([float(abs(a - b) <= 1) for a, b in both]),
        "mean_abs_count_difference": _mean([float(abs(a - b)) for a, b in both]),
        "same_first_unit": _mean(
            [
                float(bool(u and s.units and u[0] == s.units[0]))
                for u, s in zip(units, seq, strict=True)
            ]
        ),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(results: dict[str, Any]) -> Table:
    table = Table(title=f"scan benchmark ({results['device']}, {results['threads']} threads)")
    table.add_column("metric", no_wrap=True)
    named = [(group, mode) for group in results["groups"].values() for mode in group["modes"]]
    columns = [(group, group["modes"][mode]) for group, mode in named]
    for name, group in results["groups"].items():
        for mode in group["modes"]:
            table.add_column(f"{name}\n{mode}", justify="right")

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    for key in ["n", "sequential_flip_rate", "sequential_median_units", "sequential_mean_units"]:
        table.add_row(key, *(fmt(g[key]) for g, _ in columns))
    for key in [
        "flip_rate",
        "median_units_greedy",
        "mean_units_greedy",
        "median_units_minimal",
        "mean_units_minimal",
        "reference_accuracy_drop",
        "test_accuracy_drop",
        "agreement_same_count",
        "agreement_within_1",
        "mean_abs_count_difference",
        "same_first_unit",
        "same_units_as_first_variant",
        "scan_seconds",
        "batched_search_seconds",
        "sequential_search_seconds",
        "speedup_search_only",
        "speedup_full",
        "ratio_median_units_clean_over_noisy",
        "ratio_mean_units_clean_over_noisy",
    ]:
        table.add_row(key, *(fmt(v.get(key)) for _, v in columns))
    table.add_row("sequential_seconds", *(fmt(g["sequential_seconds"]) for g, _ in columns))
    for key in ["sequential_median_units", "agreement_within_1", "mean_abs_count_difference"]:
        cells = (fmt(g.get("noise_floor", {}).get(key)) for g, _ in columns)
        table.add_row(f"noise_floor_{key}", *cells)
    if "draws" not in next(iter(results["groups"].values())):
        return table
    for k, _ in enumerate(named[0][0]["draws"]["per_draw"]):
        cells = []
        for g, m in named:
            d = g["draws"]["per_draw"][k]
            cells.append(f"{fmt(d[m])} / {fmt(d['sequential_median_units'])}")
        table.add_row(f"draw {k}: median units / reference", *cells)
    pooled = [(g["draws"]["pooled"], m) for g, m in named]
    median = (f"{fmt(p[m])} / {fmt(p['sequential_median_units'])}" for p, m in pooled)
    table.add_row("pooled over draws: median units / reference", *median)
    within = (f"{p[f'{m}_draws_within_1']} of {p['n_draws']}" for p, m in pooled)
    table.add_row("draws with the medians within 1", *within)
    speedup = (fmt(p[f"{m}_speedup_search_only"]) for p, m in pooled)
    table.add_row("search speed-up over all draws", *speedup)
    return table


if __name__ == "__main__":
    main()
