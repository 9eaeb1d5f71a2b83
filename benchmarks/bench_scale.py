"""How the scan's cost grows: with the number of flagged ids, with the model, and with ranks.

Each measurement runs in a fresh process (``--worker``) so that its peak memory is its own:

* ids: the testbed's noisy ids, 50 / 100 / 200 / 400 of them, on the testbed model;
* models: memaudit's ResNet-9 at width 16, 32 and 64 and timm ``resnet18`` / ``resnet50`` at
  32x32 on the testbed's images. These are freshly initialized (training them all on a CPU
  would take hours), so each flagged id's label is set to the model's own prediction: every id
  is then searched, which is what costs; the units they need are not a memorization figure;
* ranks: the same ids scanned by one process and by ``torchrun`` with two gloo ranks (one
  thread each): the speed-up, and whether the two reports are identical.

    .venv/bin/python benchmarks/bench_scale.py --testbed memaudit-demo/testbed

Prints a table and writes ``benchmarks/results/scale.json``. Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from memaudit import load_dataset, load_model, read_ids, save_model
from memaudit.data import write_ids
from memaudit.engine import predict
from memaudit.localize import scan
from memaudit.models import DataRef, build_model
from memaudit.schema import ScanSettings

console = Console(stderr=True)
MODELS = {
    "resnet9-w16": ("memaudit:resnet9", {"width": 16}),
    "resnet9-w32": ("memaudit:resnet9", {"width": 32}),
    "resnet9-w64": ("memaudit:resnet9", {"width": 64}),
    "timm-resnet18": ("timm:resnet18", {}),
    "timm-resnet50": ("timm:resnet50", {}),
}


def worker(args: argparse.Namespace) -> None:
    """One scan in this process; prints its timing, peak memory and (with --out) the report."""
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    train = load_dataset(args.data, split="train", model=model)
    settings = ScanSettings(reference_size=args.reference_size, eval_size=0)
    start = time.perf_counter()
    report = scan(model, train, read_ids(args.ids), settings=settings, device="cpu")
    seconds = time.perf_counter() - start
    if args.report:
        Path(args.report).write_text(report.model_dump_json())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    timing = {"seconds": seconds, "peak_mb": peak, "stages": report.timing.stages}
    print(json.dumps({**timing, "precision": report.settings.precision}))


def _run(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scan(model: Path, data: Path, ids: Path, threads: int, ref: int, report: Path | None) -> Any:
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--data", str(data)]
    cmd += ["--ids", str(ids), "--threads", str(threads), "--reference-size", str(ref)]
    return _run(cmd + (["--report", str(report)] if report else []), threads)


def relabelled(name: str, tb: Path, work: Path, n: int) -> tuple[Path, Path, Path]:
    """A fresh model of ``name``, the testbed's data with ``n`` ids labelled as it predicts."""
    arch, config = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, in_chans=1, config=config)
    shown = load_model(tb / "model.safetensors").info.preprocess
    assert shown is not None
    size = 32 if arch.startswith("timm:") else shown.image_size  # timm nets at 32x32
    model.info.preprocess = shown.model_copy(update={"image_size": size})
    train = load_dataset(tb / "data.npz", split="train", model=model)
    stored = dict(np.load(tb / "data.npz"))
    rows = torch.arange(n)
    stored["train_labels"] = stored["train_labels"].copy()
    stored["train_labels"][:n] = predict(model, train, rows, device="cpu").numpy()
    data = work / f"{name}.npz"
    np.savez(data, **stored)
    model.info.train_data = DataRef(source=str(data), split="train")
    path = save_model(model, work / f"{name}.safetensors")
    ids = write_ids(work / f"{name}_ids.txt", rows.tolist())
    return path, data, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default="memaudit-demo/testbed", type=Path)
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--model-ids", type=int, default=50)
    parser.add_argument("--rank-ids", type=int, default=200)
    parser.add_argument("--reference-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/memaudit-bench-scale", type=Path)
    parser.add_argument("--out", default="benchmarks/results/scale.json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    tb, work = args.testbed, args.work
    work.mkdir(parents=True, exist_ok=True)
    noisy = read_ids(tb / "noisy_ids.txt")
    rows: list[dict[str, Any]] = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        ids = write_ids(work / f"noisy_{n}.txt", noisy[:n])
        console.print(f"{n} noisy ids on the testbed model ...")
        got = _scan(
            tb / "model.safetensors", tb / "data.npz", ids, args.threads, args.reference_size, None
        )
        rows.append({"sweep": "ids", "what": f"{n} ids, testbed ResNet-9 w16", "n": n, **got})
    for name in [m for m in args.models.split(",") if m]:
        console.print(f"{name}: {args.model_ids} ids labelled as it predicts ...")
        model, data, ids = relabelled(name, tb, work, args.model_ids)
        got = _scan(model, data, ids, args.threads, args.reference_size, None)
        rows.append({"sweep": "model", "what": name, "n": args.model_ids, **got})
    ids = write_ids(work / f"ranks_{args.rank_ids}.txt", noisy[: args.rank_ids])
    console.print(f"{args.rank_ids} ids: one process, then two gloo ranks (one thread each) ...")
    one = _scan(
        tb / "model.safetensors", tb / "data.npz", ids, 1, args.reference_size, work / "one.json"
    )
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"]
    cmd += ["memaudit", "scan", str(tb / "model.safetensors"), "--flagged", str(ids)]
    cmd += ["--out", str(work / "two.json"), "--reference-size", str(args.reference_size)]
    cmd += ["--eval-size", "0", "--device", "cpu"]
    subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    two_wall = time.perf_counter() - start
    a = json.loads((work / "one.json").read_text())
    b = json.loads((work / "two.json").read_text())
    same = [x == y for x, y in zip(a["examples"], b["examples"], strict=True)]
    two_scan = b["timing"]["seconds"]
    rows.append({"sweep": "ranks", "what": "1 process, 1 thread", "n": args.rank_ids, **one})
    rows.append(
        {
            "sweep": "ranks",
            "what": "2 gloo ranks, 1 thread each",
            "n": args.rank_ids,
            "seconds": two_scan,
            "wall_seconds_with_launch": two_wall,
            "peak_mb": None,
            "stages": b["timing"]["stages"],
            "precision": b["settings"]["precision"],
            "speedup_scan": one["seconds"] / two_scan,
            "identical_examples": sum(same),
            "identical_report": a["examples"] == b["examples"] and a["summary"] == b["summary"],
        }
    )
    table = Table(title="scan cost (CPU)")
    for col in ("sweep", "what", "ids", "s / id", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("sweep", "what", "note") else "right")
    for r in rows:
        note = ""
        if "speedup_scan" in r:
            note = f"x{r['speedup_scan']:.2f}; {r['identical_examples']}/{r['n']} identical"
        table.add_row(
            r["sweep"],
            r["what"],
            str(r["n"]),
            f"{r['seconds'] / r['n']:.3f}",
            "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}",
            note,
        )
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "testbed": str(tb),
                "threads": args.threads,
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
    )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
