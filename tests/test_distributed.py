"""A scan over several processes (gloo on CPU): the same report as one process, sharding that
keeps every id once, a failed rank then a resume with another world size, launcher errors.
Training under DDP: the weights and steps of one process."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_cnn

from memaudit.cli import main
from memaudit.data import ImageDataset, write_ids
from memaudit.dropout import TiedDropout
from memaudit.engine import RECIPES, fit
from memaudit.localize import expected_cost, scan, shard
from memaudit.models import build_model, load_model, save_model
from memaudit.schema import ScanReport, ScanSettings

IDS = list(range(12))
SETTINGS = ScanSettings(max_units=16, reference_size=16, batch_size=2, eval_size=0)


def _data(root: Path) -> ImageDataset:
    saved = torch.load(root / "data.pt")
    return ImageDataset(saved["images"], saved["labels"])


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN that memorized random labels, and its data, on disk for the workers."""
    root = tmp_path_factory.mktemp("dist")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 3, (48,), generator=gen)
    torch.save({"images": images, "labels": labels}, root / "data.pt")
    torch.manual_seed(0)
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 4})
    fit(model, ImageDataset(images, labels), epochs=25, batch_size=16, device="cpu")
    save_model(model, root / "model.safetensors")
    return root


def _worker(rank: int, world: int, root: str, run: str, kill: int | None, how: str) -> None:
    torch.set_num_threads(1)
    here = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{here / run}.rdzv",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    calls = 0

    def progress(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        if rank == kill and calls == 2:  # after its first chunk is in its journal
            if how == "exit":
                os._exit(3)  # a hard death: the launcher stops the others
            raise RuntimeError("out of memory (simulated)")

    try:
        report = scan(
            load_model(here / "model.safetensors"),
            _data(here),
            IDS,
            settings=SETTINGS,
            device="cpu",
            journal=here / f"{run}.journal.jsonl",
            on_progress=progress,
        )
        if rank == 0:
            (here / f"{run}.json").write_text(report.model_dump_json())
    except Exception as failure:  # what each rank ended with, for the test
        (here / f"{run}.error{rank}").write_text(f"{type(failure).__name__}: {failure}")
    finally:
        dist.destroy_process_group()


def _join(root: Path, run: str, world: int, kill: int | None, how: str = "exit") -> None:
    context = mp.start_processes(
        _worker,
        args=(world, str(root), run, kill, how),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    try:
        while not context.join(timeout=120):
            pass
    except mp.ProcessExitedException:
        if kill is None:
            raise
        for process in context.processes:  # the others have finished or stopped by now
            process.join(timeout=60)


def _same(a: ScanReport, b: ScanReport) -> None:
    assert a.examples == b.examples
    assert a.summary == b.summary


def test_sharding_keeps_every_id_exactly_once_and_balances_cost() -> None:
    gen = torch.Generator().manual_seed(0)
    for world in range(1, 6):
        for n in range(0, 40):
            costs = torch.rand(n, generator=gen)
            parts = shard(costs, world)
            assert len(parts) == world
            assert sorted(torch.cat(parts).tolist()) == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
    dear_first = shard(torch.tensor([9.0, 8.0, 1.0, 0.0]), 2)
    assert [p.tolist() for p in dear_first] == [[0, 3], [1, 2]]  # not blocks: each a dear one


def test_expected_cost_is_zero_for_misclassified_rows(bed: Path) -> None:
    model, data = load_model(bed / "model.safetensors"), _data(bed)
    costs = expected_cost(model, data, torch.arange(len(data)), device=torch.device("cpu"))
    wrong = model.eval()(data.batch(torch.arange(len(data)))).argmax(1) != data.labels
    assert bool((costs[wrong] == 0).all()) and bool((costs[~wrong] >= 1).all())


def test_two_ranks_give_the_single_process_report(bed: Path) -> None:
    single = scan(load_model(bed / "model.safetensors"), _data(bed), IDS, settings=SETTINGS)
    assert single.summary.n_flipped >= 6  # not vacuous
    _join(bed, "two", 2, None)
    _same(ScanReport.model_validate_json((bed / "two.json").read_text()), single)
    assert (bed / "two.journal.rank0.jsonl").exists() and (bed / "two.journal.rank1.jsonl").exists()


def test_a_rank_whose_search_fails_lets_rank_0_name_the_missing_ids(bed: Path) -> None:
    _join(bed, "raised", 2, kill=1, how="raise")
    said = (bed / "raised.error0").read_text()
    assert said.startswith("MemauditError: the scan did not finish (rank 1 failed)")
    assert "missing" in said and "--resume" in said
    assert "out of memory" in (bed / "raised.error1").read_text()  # its own error, its own


def test_a_killed_rank_then_resume_with_one_process_gives_the_same_report(bed: Path) -> None:
    single = scan(load_model(bed / "model.safetensors"), _data(bed), IDS, settings=SETTINGS)
    _join(bed, "killed", 2, kill=1)
    held: list[int] = []
    report = scan(
        load_model(bed / "model.safetensors"),
        _data(bed),
        IDS,
        settings=SETTINGS,
        journal=bed / "killed.journal.jsonl",
        resume=True,
        on_progress=lambda done, total: held.append(done),
    )
    assert 0 < held[0] < len(IDS)  # what the journals held was not searched again
    _same(report, single)


def test_launcher_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bed: Path
) -> None:
    import numpy as np

    data = _data(bed)
    np.savez(tmp_path / "d.npz", images=data.images[:, 0].numpy(), labels=data.labels.numpy())
    write_ids(tmp_path / "ids.txt", [0, 1, 2])
    argv = ["scan", str(bed / "model.safetensors"), "--flagged", str(tmp_path / "ids.txt")]
    argv += ["--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "s.json")]
    argv += ["--device", "cpu", "--min-train-accuracy", "0"]

    def error_line() -> str:
        said = capsys.readouterr().err
        errors = [line for line in said.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in said, said
        return errors[0]

    monkeypatch.setenv("WORLD_SIZE", "5")
    assert main(argv) == 2
    assert "5 processes for 3 flagged ids" in error_line()
    assert main(["unlearn", *argv[1:4], "--out-model", str(tmp_path / "u.safetensors")]) == 2
    assert "memaudit unlearn runs in one process" in error_line()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "9")  # nothing listens there
    monkeypatch.setenv("MEMAUDIT_DIST_TIMEOUT", "3")
    assert main(argv) == 2
    assert "cannot join the torchrun rendezvous at 127.0.0.1:9" in error_line()


# --- training under DDP ----------------------------------------------------------------------


def _tied(data: ImageDataset, rows: torch.Tensor, batch_size: int, recipe: Any) -> dict[str, Any]:
    """A tiny CNN (no BatchNorm) trained with example-tied dropout: weights, epoch losses."""
    torch.manual_seed(0)
    net = tiny_cnn()
    etd = TiedDropout(net, after=["0", "2", "6"], p_gen=0.5, p_mem=0.5, seed=3)
    losses: list[float] = []
    with etd.attached() as masks:
        fit(
            net,
            data,
            rows,
            epochs=2,
            batch_size=batch_size,
            recipe=recipe,
            seed=1,
            device="cpu",
            around_batch=lambda ids: masks.applied(etd.masks(ids)),
            on_epoch=lambda e: losses.append(e.loss),
        )
    return {"weights": net.state_dict(), "losses": losses}


def _ascent(data: ImageDataset) -> dict[str, Any]:
    """Gradient ascent in batches of 6 of 20 rows, stopped in its 4th epoch (measured)."""
    torch.manual_seed(0)
    net, steps = tiny_cnn(), []
    fit(net, data, epochs=20, batch_size=8, device="cpu")
    fit(
        net,
        data,
        torch.arange(20),
        epochs=10,
        batch_size=6,
        lr=0.2,
        momentum=0.0,
        schedule="constant",
        ascend=True,
        stop_loss=1.5 * math.log(3),
        device="cpu",
        on_batch=lambda ids: steps.append(len(ids)),
    )
    return {"weights": net.state_dict(), "steps": len(steps)}


def _fits(data: ImageDataset) -> dict[str, dict[str, Any]]:
    """The fits compared between one process and two ranks. 17 rows in batches of 8: the last
    batch of one row leaves rank 1 without a share; AdamW with clipping in batches of 5:
    shares of 3 and 2."""
    return {
        "tied": _tied(data, torch.arange(17), 8, None),
        "adamw": _tied(data, torch.arange(22), 5, RECIPES["transformer"]),
        "ascent": _ascent(data),
    }


def _fit_worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    here = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{here / 'fit.rdzv'}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.save(_fits(_data(here)), here / f"fit.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fit_on_two_ranks_gives_the_single_process_weights(bed: Path) -> None:
    single = _fits(_data(bed))
    mp.start_processes(_fit_worker, args=(2, str(bed)), nprocs=2, start_method="spawn")
    ranks = [torch.load(bed / f"fit.rank{r}.pt") for r in range(2)]
    for name, one in single.items():
        for k, value in one["weights"].items():
            assert torch.equal(ranks[0][name]["weights"][k], ranks[1][name]["weights"][k])
            torch.testing.assert_close(ranks[0][name]["weights"][k], value, rtol=1e-5, atol=1e-6)
    for name in ("tied", "adamw"):
        assert ranks[0][name]["losses"] == pytest.approx(single[name]["losses"], rel=1e-5)
    assert 12 < single["ascent"]["steps"] < 40  # stopped, not at the first step
    assert ranks[0]["ascent"]["steps"] == ranks[1]["ascent"]["steps"] == single["ascent"]["steps"]
