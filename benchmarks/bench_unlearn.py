"""Unlearning on the label-noise testbed: every method side by side, against retraining.

For each forget kind the testbed writes (``forget_KIND.txt``: mislabeled, mislabeled-part,
random-1, random-10, class) and each seed, runs every registered unlearning method on the
trained model and compares it with the yardstick measured on the same ids: a model retrained
from scratch without them, and the membership test (:mod:`memaudit.membership`) against
reference models trained without them (enough that TPR at 1% FPR resolves). Seed 0 uses the
testbed's file; other seeds draw the same kind afresh (mislabeled is the same set) and seed the
methods, the retraining and the references. Retrained models are cached in ``--cache``;
results are written after every (kind, seed), and ``--resume`` continues an interrupted run.

    .venv/bin/python benchmarks/bench_unlearn.py --testbed memaudit-demo/testbed --seeds 3
    .venv/bin/python benchmarks/bench_unlearn.py --forget random-1 --seeds 1
    .venv/bin/python benchmarks/bench_unlearn.py --overhead-only
    .venv/bin/python benchmarks/bench_unlearn.py --budget 0.1  # every method at 3 epochs
    .venv/bin/python benchmarks/bench_unlearn.py --arch hf:vit,timm:vit,timm:convnext --seeds 1

``--arch`` trains a testbed on each of those architectures (small ViTs and a ConvNeXt, by their
family's recipe, in ``--cache``) and unlearns its mislabeled ids there.

``--overhead-only`` measures example-tied dropout's training-step time with and without it, and
its memory for 1M example ids. ``--timing`` times retraining and each method one after the
other in one process, on the first ``--forget`` kind (the runs' seconds come from whatever else
shared the CPU; this is the figure to compare, with nothing else running). Prints tables
(mean ± sd over seeds; ``--markdown`` for the README) and writes
``benchmarks/results/unlearn.json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memaudit import load_dataset, load_model, read_ids, save_model
from memaudit.cli._unlearn import parse_options
from memaudit.dropout import TiedDropout
from memaudit.masks import traced
from memaudit.models import Classifier
from memaudit.schema import UnlearnReport
from memaudit.testbed import FORGET_KINDS, TestbedConfig, build_testbed, forget_sets
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
    etd = TiedDropout(tied)
    opts = {
        k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9)
        for k, n in (("plain", plain), ("etd", tied))
    }
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"plain": [], "etd": []}
    with etd.attached() as masks:
        for k in range(steps + 2):  # two warm-up steps
            ids = torch.randperm(len(data), generator=gen)[:batch]
            x, y = data.batch(ids), data.labels[ids]
            for name, net in (("plain", plain), ("etd", tied)):
                start = time.perf_counter()
                scope = masks.applied(etd.masks(ids)) if name == "etd" else contextlib.nullcontext()
                with scope:
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
    etd = TiedDropout(net)
    layers = [(name, net.net.get_submodule(name)) for name in etd.names]
    with torch.no_grad(), traced(layers) as calls:  # the outputs' shapes, for the dense table
        net.eval()(data.batch(torch.arange(2)))
    shapes = {c.name: tuple(c.output.shape[1:]) for c in calls}
    state = sum(t.numel() * t.element_size() for t in vars(etd).values() if torch.is_tensor(t))
    rss0 = _rss_mb()
    start = time.perf_counter()
    for ids in torch.arange(n_ids).split(batch):
        etd.masks(ids)
    seconds = time.perf_counter() - start
    dense = n_ids * sum(torch.Size(s).numel() for s in shapes.values())  # bool table bytes
    return {
        "n_ids": n_ids,
        "layers": len(layers),
        "state_bytes": state,
        "rss_growth_mb": round(_rss_mb() - rss0, 2),
        "mask_bytes_per_batch": batch * etd.space.total * 4,
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


KINDS = tuple(FORGET_KINDS)
FIGURES = (
    ("flagged", "flagged acc"),
    ("retained", "retained acc"),
    ("test", "test acc"),
    ("auc", "membership AUC"),
    ("tpr1", "TPR@1%FPR"),
    ("gap", "avg gap"),
    ("seconds", "seconds"),
)


def forget_ids(tb: Path, kind: str, seed: int, train: Any) -> list[int]:
    """The forget ids of ``kind`` for ``seed``: the testbed's file for seed 0, a fresh draw of the
    same kind (:func:`memaudit.testbed.forget_sets`) for other seeds. ``mislabeled`` is the same
    set for every seed."""
    info = json.loads((tb / "testbed.json").read_text())
    path = tb / f"forget_{kind}.txt"
    if seed == 0 and path.exists():
        return read_ids(path)
    noisy = torch.as_tensor(train.rows(read_ids(tb / "noisy_ids.txt")))
    rows = forget_sets(train.labels, noisy, seed=info["config"]["seed"] + seed)[kind]
    return train.ids_of(rows)


# Small models of the other families on the testbed's digits (``--arch``): trained by
# ``memaudit testbed`` with their family's recipe (AdamW + warm-up + cosine), for as many
# epochs as they take to memorize the noisy labels (a ViT at 40 epochs fit 30% of them).
ARCHS: dict[str, dict[str, Any]] = {
    "hf:vit": {"arch": "hf:vit", "epochs": 80},  # memaudit's small HF ViT, 49 tokens
    "timm:vit": {
        "arch": "timm:test_vit",
        "arch_config": {"img_size": 28, "patch_size": 4},
        "epochs": 80,
    },
    "timm:convnext": {  # stem stride 2 at 32x32 leaves 16, 8, 4, 2 pixels to the 4 stages
        "arch": "timm:test_convnext",
        "arch_config": {"patch_size": 2},
        "image_size": 32,
        "epochs": 60,
    },
}


def arch_testbed(name: str, root: Path, epochs: int | None) -> Path:
    """The testbed of ``name`` (:data:`ARCHS`; ``epochs`` overrides its own) in ``root``,
    trained once and reused after."""
    where = root / f"testbed-{name.replace(':', '-')}"
    if not (where / "testbed.json").exists():
        config = TestbedConfig(**{**ARCHS[name], **({"epochs": epochs} if epochs else {})})
        console.print(f"training the {name} testbed ({config.epochs} epochs) ...")
        result = build_testbed(where, config, device="cpu")
        console.print(f"  {result.seconds:.0f} s, test {100 * result.test_accuracy:.1f}%")
    return where


def n_references(n_ids: int) -> int:
    """Enough references that TPR at 1% FPR is resolvable: ``K * n >= 100`` negatives, K >= 2."""
    return max(2, math.ceil(100 / n_ids))


def yardstick(
    model: Classifier,
    train: Any,
    test: Any,
    ids: list[int],
    *,
    seed: int,
    cache: Path,
    kind: str,
    references: int | None,
) -> tuple[Classifier, list[Classifier], float]:
    """The retrained model and the membership references for these ids (``references`` of them,
    default :func:`n_references`; 0: no membership test), cached on disk."""
    k = n_references(len(ids)) if references is None else references
    where = cache / f"{kind}-seed{seed}"
    meta = where / "yardstick.json"
    saved = json.loads(meta.read_text()) if meta.exists() else {}
    if saved.get("ids") == ids and saved["k"] >= k:
        refs = [load_model(where / f"reference_{j}.safetensors") for j in range(k)]
        return load_model(where / "retrain.safetensors"), refs, saved["retrain_seconds"]
    console.print(f"  retraining + {k} membership references without the {len(ids)} ids ...")
    gold = unlearn(
        model,
        train,
        ids,
        test=test,
        method="retrain",
        membership_references=k,
        seed=seed,
        device="cpu",
    )
    where.mkdir(parents=True, exist_ok=True)
    save_model(gold.model, where / "retrain.safetensors")
    for j, ref in enumerate(gold.references):
        save_model(ref, where / f"reference_{j}.safetensors")
    seconds = gold.report.seconds
    meta.write_text(json.dumps({"ids": ids, "k": k, "retrain_seconds": seconds}))
    return gold.model, list(gold.references), seconds


def figures(report: UnlearnReport, which: str) -> dict[str, float | None]:
    """One row's figures: accuracies, the membership test after unlearning, the average gap."""
    scores = {"before": report.before, "after": report.after, "retrain": report.retrain}[which]
    assert scores is not None
    member = getattr(report.membership, which) if report.membership else None
    gap = report.average_gap() if which == "after" else None
    if which == "retrain":
        gap = 0.0
    return {
        "flagged": scores.flagged_accuracy,
        "retained": scores.retained_accuracy,
        "test": scores.test_accuracy,
        "auc": member.auc.value if member else None,
        "tpr1": member.tpr_at_1pct_fpr.value if member else None,
        "gap": gap,
        "seconds": report.seconds if which == "after" else None,
    }


def method_spec(entry: str) -> tuple[str, dict[str, Any]]:
    """A ``--methods`` entry, ``NAME`` or ``NAME:KEY=VALUE:...``, as the method and its options
    (e.g. ``example-tied-dropout:hold_weight=0``; the entry is its row's label)."""
    name, *pairs = entry.split(":")
    return name, parse_options(pairs)


def resumable(saved: dict[str, Any], out: Path, **settings: Any) -> None:
    """Exit with a one-line message when the runs in ``out`` were made with other
    ``settings`` (e.g. another ``--budget``): resuming would mix them in one table."""
    if not saved.get("runs"):
        return
    if differ := [k for k, v in settings.items() if k in saved and saved[k] != v]:
        said = ", ".join(f"{k} {saved[k]!r} (now {settings[k]!r})" for k in differ)
        message = f"--resume: the runs in {out} were made with {said}; use a new --out"
        print(message, file=sys.stderr)
        raise SystemExit(2)


def run_one(
    tb: Path,
    kind: str,
    seed: int,
    methods: list[str],
    cache: Path,
    references: int | None,
    budget: float | None = None,
    method_seed: int | None = None,
) -> dict[str, dict[str, float | None]]:
    """Each of ``methods`` on ``kind``'s ids of ``seed`` against their yardstick; the methods
    are seeded with ``method_seed`` (default: ``seed``). A ``retrain`` entry is a second
    retraining, with retraining's own epochs whatever the ``budget``, in the row
    ``retrain again``: the floor of what "close to retraining" can mean."""
    model = load_model(tb / "model.safetensors")
    train = load_dataset(tb / "data.npz", split="train", model=model)
    test = load_dataset(tb / "data.npz", split="test", model=model)
    ids = forget_ids(tb, kind, seed, train)
    retrained, refs, retrain_seconds = yardstick(
        model, train, test, ids, seed=seed, cache=cache, kind=kind, references=references
    )
    rows: dict[str, dict[str, float | None]] = {}
    for method in methods:
        console.print(f"  {escape(method)} ...")
        name, options = method_spec(method)
        again = name == "retrain"
        result = unlearn(
            model,
            train,
            ids,
            test=test,
            method=name,
            options=options,
            retrained=retrained,
            references=refs,
            seed=seed if method_seed is None else method_seed,
            budget=None if again else budget,
            device="cpu",
        )
        if not rows:
            rows["original model"] = figures(result.report, "before")
            rows["retrain"] = {**figures(result.report, "retrain"), "seconds": retrain_seconds}
        rows["retrain again" if again else method] = figures(result.report, "after")
    return rows


def time_methods(tb: Path, kind: str, methods: list[str], budget: float | None) -> dict[str, float]:
    """Wall seconds of retraining and of each method on ``kind``'s seed-0 ids, one after the
    other in this process (no membership test, no yardstick: only the method's own work)."""
    model = load_model(tb / "model.safetensors")
    train = load_dataset(tb / "data.npz", split="train", model=model)
    ids = forget_ids(tb, kind, 0, train)
    seconds = {}
    for method in ["retrain", *methods]:
        console.print(f"  timing {escape(method)} ...")
        name, options = method_spec(method)
        start = time.perf_counter()
        unlearn(
            model,
            train,
            ids,
            method=name,
            options=options,
            budget=None if method == "retrain" else budget,
            device="cpu",
        )
        seconds[method] = time.perf_counter() - start
    return seconds


def print_timing(seconds: dict[str, float]) -> None:
    table = Table(title="wall time, one process, one after the other")
    for column in ("method", "seconds", "share of retraining"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method, value in seconds.items():
        table.add_row(escape(method), f"{value:.1f}", f"{100 * value / seconds['retrain']:.1f}%")
    console.print(table)


def _mean_sd(values: list[float | None]) -> tuple[float, float] | None:
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarize_runs(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Mean and sd over seeds of every figure, per kind and method."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind, by_seed in runs.items():
        methods = list(next(iter(by_seed.values())))
        out[kind] = {
            m: {key: _mean_sd([by_seed[s][m][key] for s in by_seed]) for key, _ in FIGURES}
            for m in methods
        }
    return out


def _cell(key: str, value: tuple[float, float] | None) -> str:
    if value is None:
        return "-"
    mean, sd = value
    if key == "seconds":
        return f"{mean:.1f} ± {sd:.1f}"
    if key == "auc":
        return f"{mean:.3f} ± {sd:.3f}"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def print_tables(summary: dict[str, Any], seeds: dict[str, int], markdown: bool) -> None:
    for kind, rows in summary.items():
        title = f"forget '{kind}' ({seeds[kind]} seeds, mean ± sd)"
        if markdown:
            print(f"\n**{kind}** ({seeds[kind]} seeds)\n")
            print("| method | " + " | ".join(label for _, label in FIGURES) + " |")
            print("|---|" + "---:|" * len(FIGURES))
            for m, figs in rows.items():
                print(f"| {m} | " + " | ".join(_cell(k, figs[k]) for k, _ in FIGURES) + " |")
            continue
        table = Table(title=title)
        table.add_column("method")
        for _, label in FIGURES:
            table.add_column(label, justify="right")
        for m, figs in rows.items():
            table.add_row(escape(m), *(_cell(k, figs[k]) for k, _ in FIGURES))
        Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--testbed", default="memaudit-demo/testbed")
    parser.add_argument(
        "--arch",
        help=f"instead of --testbed: testbeds of these architectures ({', '.join(ARCHS)}), "
        "built in --cache; forget 'mislabeled', no membership test unless --references",
    )
    parser.add_argument(
        "--arch-epochs", type=int, help="training epochs (default: each architecture's in ARCHS)"
    )
    parser.add_argument("--forget", help=f"a kind ({', '.join(KINDS)}) or 'all' (the default)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-list", help="run only these seeds (comma-separated), e.g. 2")
    parser.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m != "retrain"),
        help="comma-separated; NAME:KEY=VALUE:... runs a method with those options",
    )
    parser.add_argument(
        "--references", type=int, help="membership references (default: enough for TPR@1%%FPR)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--budget", type=float, help="every method's epochs as this share of retraining's"
    )
    parser.add_argument("--cache", default="/tmp/memaudit-bench-unlearn", help="retrained models")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the ETD overhead (step time, memory), into the etd_overhead of --out",
    )
    parser.add_argument(
        "--timing",
        action="store_true",
        help="only time retraining and each method on the first --forget kind, one after the "
        "other in this process (run it alone), into the timing of --out",
    )
    parser.add_argument("--out", help="default: benchmarks/results/unlearn[_archs].json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    archs = args.arch.split(",") if args.arch else []
    if unknown := [a for a in archs if a not in ARCHS]:
        parser.error(f"unknown --arch {unknown}; choose from {', '.join(ARCHS)}")
    out = Path(args.out or f"benchmarks/results/unlearn{'_archs' if archs else ''}.json")
    saved = json.loads(out.read_text()) if out.exists() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.overhead_only:
        model = load_model(Path(args.testbed) / "model.safetensors")
        train = load_dataset(Path(args.testbed) / "data.npz", split="train", model=model)
        overhead = measure_overhead(model, train, steps=args.steps)
        print_overhead(overhead)
        out.write_text(json.dumps({**saved, "etd_overhead": overhead}, indent=2))
        console.print(f"updated etd_overhead in {out}")
        return
    forget = args.forget or ("mislabeled" if archs else "all")
    kinds = KINDS if forget == "all" else tuple(forget.split(","))
    methods = [m for m in args.methods.split(",") if m]
    if args.timing:
        seconds = time_methods(Path(args.testbed), kinds[0], methods, args.budget)
        print_timing(seconds)
        timing = {"kind": kinds[0], "budget": args.budget, "threads": args.threads, **seconds}
        out.write_text(json.dumps({**saved, "timing": timing}, indent=2))
        console.print(f"updated timing in {out}")
        return
    # (label, testbed, kind, cache of its yardsticks): one per kind, or per architecture and kind
    settings = [
        (f"{a} {kind}", arch_testbed(a, cache, args.arch_epochs), kind, cache / a.replace(":", "-"))
        for a in archs
        for kind in kinds
    ] or [(kind, Path(args.testbed), kind, cache) for kind in kinds]
    references = 0 if archs and args.references is None else args.references
    if args.resume:
        resumable(saved, out, methods=methods, budget=args.budget, threads=args.threads)
    runs: dict[str, dict[str, Any]] = saved.get("runs", {}) if args.resume else {}
    seeds = [int(s) for s in args.seed_list.split(",")] if args.seed_list else range(args.seeds)
    for label, tb, kind, where in settings:
        for seed in seeds:
            if str(seed) in runs.get(label, {}):
                continue
            console.print(f"{escape(label)}, seed {seed}:")
            start = time.perf_counter()
            done = run_one(tb, kind, seed, methods, where, references, args.budget)
            runs.setdefault(label, {})[str(seed)] = done
            console.print(f"  {time.perf_counter() - start:.0f} s")
            out.write_text(  # after every run: an interrupted benchmark resumes from here
                json.dumps(
                    {
                        **{k: v for k, v in saved.items() if k in ("etd_overhead", "timing")},
                        "testbeds": {label: str(tb) for label, tb, _, _ in settings},
                        "methods": methods,
                        "budget": args.budget,
                        "threads": args.threads,
                        "machine": platform.processor() or platform.machine(),
                        "torch": torch.__version__,
                        "runs": runs,
                        "summary": summarize_runs(runs),
                    },
                    indent=2,
                )
            )
    labels = [label for label, *_ in settings]
    summary = summarize_runs({k: v for k, v in runs.items() if k in labels})
    print_tables(summary, {k: len(runs[k]) for k in summary}, args.markdown)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
