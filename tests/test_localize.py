"""The batched greedy search: right answers on known models, batching, scorers, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memaudit import Auditor, MemauditError, localize
from memaudit.data import ImageDataset
from memaudit.localize import (
    SCORERS,
    Reference,
    ScoreContext,
    exact_reference_grad,
    scan_settings,
)
from memaudit.masks import UnitMasks
from memaudit.models import Preprocess, load_model
from memaudit.schema import ScanReport, Status


def _hand_model() -> nn.Module:
    """Features x0, x1 in [0, 1]. h0 = relu(x0), h1 = relu(x1), h2 = 1 (bias).

    logit0 = h2 (class 0 by default), logit1 = 3 * h0: an input with x0 = 1 is class 1 only
    because of unit h0, so zeroing ("1", 0) is the one-unit flip.
    """
    hidden = nn.Linear(2, 3)
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        hidden.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        head.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0]]))
    return nn.Sequential(nn.Flatten(), hidden, nn.ReLU(), head)


def _hand_data() -> ImageDataset:
    pixels = torch.zeros(12, 1, 1, 2, dtype=torch.uint8)
    pixels[0, 0, 0, 0] = 255  # class 1 through h0
    pixels[1, 0, 0, 1] = 255  # labelled 1, but h1 has no path to the logits: misclassified
    labels = torch.tensor([1, 1] + [0] * 10)
    return ImageDataset(pixels, labels, Preprocess(mean=(0.0,), std=(1.0,)))


def test_hand_built_model_flips_on_the_known_unit() -> None:
    report = Auditor(_hand_model(), _hand_data(), device="cpu").scan([0, 1], max_units=3)
    flipped, wrong = report.examples
    assert flipped.status is Status.FLIPPED and flipped.flipped
    assert [(u.layer, u.index) for u in flipped.units] == [("1", 0)]
    assert flipped.n_units == flipped.n_units_minimal == 1
    assert (flipped.predicted_before, flipped.predicted_after) == (1, 0)
    assert wrong.status is Status.MISCLASSIFIED and wrong.n_units == 0 and not wrong.flipped
    assert report.summary.n_misclassified == 1 and report.summary.flip_rate == 1.0


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, ImageDataset, ImageDataset]:
    """A tiny CNN that has memorized random labels of random images (a miniature testbed)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = _TinyCNN()
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8, generator=gen)
    data = ImageDataset(images, torch.arange(40) % 3)
    x = data.batch(torch.arange(40))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(120):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), data.labels).backward()
        opt.step()
    model.eval()
    test = ImageDataset(images[:16].clone(), data.labels[:16].clone())
    return model, data, test


def _units(report: ScanReport) -> list[list[tuple[str, int]]]:
    return [[(u.layer, u.index) for u in e.units] for e in report.examples]


def test_batched_equals_one_at_a_time(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    model, data, test = tiny
    auditor = Auditor(model, data, test, device="cpu")
    ids = list(range(8))
    batched = auditor.scan(ids, batch_size=8, max_units=20, reference_size=16)
    single = auditor.scan(ids, batch_size=1, max_units=20, reference_size=16)
    assert batched.summary.n_flipped >= 6  # not vacuous: the search did find units
    assert _units(batched) == _units(single)
    assert [e.n_units for e in batched.examples] == [e.n_units for e in single.examples]
    assert [e.test_accuracy for e in batched.examples] == pytest.approx(
        [e.test_accuracy for e in single.examples]
    )


def test_masks_do_not_leak_between_examples(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """An example's result does not depend on which other examples share its batch."""
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    alone = auditor.scan([3], max_units=20, reference_size=16)
    crowd = auditor.scan([7, 3, 5, 0], max_units=20, reference_size=16)
    assert _units(alone)[0] == _units(crowd)[1]


def test_pruned_set_still_flips_and_is_minimal(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    model, data, _ = tiny
    classifier = load_model(model)
    report = Auditor(classifier, data, device="cpu").scan(list(range(6)), max_units=20)
    space = classifier.units()
    for example in report.examples:
        if not example.flipped:
            continue
        assert example.n_units_minimal <= example.n_units
        flat = [space.flat(u) for u in _as_units(example)]
        assert _flips(classifier, data, example.id, flat)
        for drop in flat:  # no single unit of the minimal set can go
            assert not _flips(classifier, data, example.id, [u for u in flat if u != drop])


def _as_units(example):  # type: ignore[no-untyped-def]
    return list(example.units)


def _flips(model, data, row, flat):  # type: ignore[no-untyped-def]
    from memaudit.masks import UnitMasks

    space = model.units()
    mask = torch.ones(1, space.total)
    mask[0, flat] = 0
    with UnitMasks(model.net, space) as masks, torch.no_grad(), masks.applied(mask):
        return int(model(data.batch(torch.tensor([row]))).argmax(1)) != int(data.labels[row])


@pytest.mark.parametrize("scorer", ["random", "integrated-gradients"])
def test_other_scorers_flip(
    scorer: str, tiny: tuple[nn.Module, ImageDataset, ImageDataset]
) -> None:
    model, data, _ = tiny
    report = Auditor(model, data, device="cpu").scan(
        [0, 1, 2], scorer=scorer, max_units=30, reference_size=8, ig_steps=4
    )
    assert report.settings.scorer == scorer
    assert report.summary.n_flipped + report.summary.n_budget_exhausted == 3
    if scorer == "integrated-gradients":
        assert report.summary.n_flipped >= 1


def test_first_order_scorer_beats_random(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    ids = list(range(12))
    smart = auditor.scan(ids, max_units=40, prune=False)
    rand = auditor.scan(ids, max_units=40, prune=False, scorer="random")
    assert smart.summary.flip_rate >= rand.summary.flip_rate
    assert (smart.summary.mean_units or 0) < (rand.summary.mean_units or 99)


def test_noise_averaging_runs(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    model, data, _ = tiny
    report = Auditor(model, data, device="cpu").scan([0, 1], noise_copies=3, max_units=20)
    assert report.settings.noise_copies == 3 and report.summary.n_flagged == 2


@pytest.mark.parametrize("scorer,copies", [("grad-x-act", 3), ("random", 0)])
def test_random_draws_are_each_examples_own(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], scorer: str, copies: int
) -> None:
    """Noise and random scores are keyed on the example id: an example's result is the same
    whichever examples share its batch, and in whatever order (as on another process)."""
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    options = {"scorer": scorer, "noise_copies": copies, "max_units": 20, "reference_size": 16}
    together = auditor.scan(list(range(8)), batch_size=8, **options)
    apart = auditor.scan(list(range(7, -1, -1)), batch_size=3, **options)
    by_id = {e.id: e for e in apart.examples}
    assert together.summary.n_flipped >= 4
    assert [(e.units, e.steps) for e in together.examples] == [
        (by_id[e.id].units, by_id[e.id].steps) for e in together.examples
    ]
    other_seed = auditor.scan(list(range(8)), batch_size=8, **options, seed=1)
    if scorer == "random":
        assert _units(other_seed) != _units(together)


def test_the_report_times_each_stage(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    model, data, test = tiny
    report = Auditor(model, data, test, device="cpu").scan(list(range(6)), max_units=20)
    stages = report.timing.stages
    assert set(stages) == {"reference", "search", "prune", "evaluation"}
    assert all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= report.timing.seconds


def test_bf16_precision_runs_the_forwards_in_bfloat16(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """``precision="bf16"``: convolutions see bfloat16 under autocast; the search still flips the
    memorized examples, mostly with the float32 search's units."""
    net, data, test = tiny
    model = Auditor(net, data, device="cpu").model
    seen: set[torch.dtype] = set()
    handle = net.conv2.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    options: dict[str, Any] = {"max_units": 20, "reference_size": 16, "eval_size": 16}
    try:
        low = localize.scan(
            model,
            data,
            list(range(8)),
            test=test,
            device="cpu",
            settings=scan_settings(precision="bf16", **options),
        )
    finally:
        handle.remove()
    full = localize.scan(
        model, data, list(range(8)), test=test, device="cpu", settings=scan_settings(**options)
    )
    assert seen == {torch.bfloat16}
    assert low.settings.precision == "bf16" and low.summary.n_flipped >= 6
    assert sum(a == b for a, b in zip(_units(low), _units(full), strict=True)) >= 4


def test_mixed_precision_runs_the_refreshes_and_the_evaluation_in_bfloat16(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``precision="mixed"``: the exact reference gradients (the refreshes) see bfloat16, the
    after-edit accuracy bfloat16 with its close calls in float32, the search and pruning only
    float32; ``auto`` picks it where the device has native bfloat16 and float32 elsewhere, and
    the report holds the precision used."""
    net, data, _ = tiny
    model = Auditor(net, data, device="cpu").model
    ids, options = list(range(8)), {"max_units": 20, "reference_size": 8, "shared_units": 0}
    seen: list[tuple[int, torch.dtype]] = []
    handle = net.conv2.register_forward_hook(lambda m, i, o: seen.append((len(o), o.dtype)))
    spans: dict[str, list[int]] = {"refresh": [], "evaluation": []}

    def spy(stage: str, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            before = len(seen)
            out = fn(*args, **kwargs)
            spans[stage].extend(range(before, len(seen)))
            return out

        return wrapped

    monkeypatch.setattr(
        localize._search, "exact_reference_grad", spy("refresh", localize.exact_reference_grad)
    )
    monkeypatch.setattr(
        localize._scan, "edited_accuracy", spy("evaluation", localize.edited_accuracy)
    )
    try:
        low = localize.scan(
            model, data, ids, device="cpu", settings=scan_settings(precision="mixed", **options)
        )
    finally:
        handle.remove()
    assert spans["refresh"] and {seen[k][1] for k in spans["refresh"]} == {torch.bfloat16}
    assert torch.bfloat16 in {seen[k][1] for k in spans["evaluation"]}
    elsewhere = set(spans["refresh"]) | set(spans["evaluation"])
    assert {dtype for k, (_, dtype) in enumerate(seen) if k not in elsewhere} == {torch.float32}
    assert low.settings.precision == "mixed" and low.summary.n_flipped >= 6
    full = localize.scan(model, data, ids, device="cpu", settings=scan_settings(**options))
    assert full.settings.precision == "float32"  # auto, on a CPU taken as without bf16
    assert sum(a == b for a, b in zip(_units(low), _units(full), strict=True)) >= 4
    monkeypatch.setattr(localize._search, "native_bf16", lambda device: True)
    assert localize.resolved(scan_settings(), torch.device("cpu")).precision == "mixed"


def test_checked_bfloat16_evaluation_gives_the_float32_accuracies(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """The after-edit accuracy in bfloat16, close calls redone in float32, equals the float32
    accuracy edit for edit, and most predictions stay in bfloat16."""
    model, data, _ = tiny
    classifier = Auditor(model, data, device="cpu").model.eval()
    space, cpu = classifier.units(), torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    sets = [torch.randperm(space.total, generator=gen)[: 1 + k % 4].tolist() for k in range(30)]
    dtypes: list[tuple[int, torch.dtype]] = []
    handle = model.conv2.register_forward_hook(lambda m, i, o: dtypes.append((len(o), o.dtype)))
    rows = torch.arange(len(data))
    with UnitMasks(classifier.net, space) as masks:
        exact = localize.edited_accuracy(classifier, masks, sets, data, rows, device=cpu)
        dtypes.clear()
        checked = localize.edited_accuracy(
            classifier, masks, sets, data, rows, device=cpu, checked_bf16=True
        )
    handle.remove()
    torch.testing.assert_close(checked, exact, rtol=0, atol=0)
    low = sum(n for n, d in dtypes if d == torch.bfloat16)
    redone = sum(n for n, d in dtypes if d == torch.float32) - len(rows)  # less the calibration
    assert low >= len(rows) * 20 and 0 <= redone < low / 2


def test_budget_exhausted(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    model, data, _ = tiny
    report = Auditor(model, data, device="cpu").scan(list(range(10)), max_units=1)
    assert Auditor(model, data, device="cpu").scan([0], max_units=500).examples[0].n_units <= 14
    statuses = {e.status for e in report.examples}
    assert Status.BUDGET_EXHAUSTED in statuses
    for e in report.examples:
        if e.status is Status.BUDGET_EXHAUSTED:
            assert e.n_units == 1 and not e.flipped and e.reference_accuracy is None


def test_resume_after_interruption_gives_the_same_report(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], tmp_path: Path
) -> None:
    model, data, test = tiny
    auditor = Auditor(model, data, test, device="cpu")
    ids = list(range(9))
    full = auditor.scan(ids, batch_size=3, max_units=20)
    journal = tmp_path / "scan.journal.jsonl"

    def crash(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        auditor.scan(ids, batch_size=3, max_units=20, journal=journal, on_progress=crash)
    assert len(journal.read_text().splitlines()) == 1 + 6  # header + two finished chunks
    with journal.open("a") as f:
        f.write('{"id": 6, "lab')  # a line cut short by the crash
    seen: list[int] = []
    resumed = auditor.scan(
        ids,
        batch_size=3,
        max_units=20,
        journal=journal,
        resume=True,
        on_progress=lambda done, total: seen.append(done),
    )
    assert seen[0] == 6  # the finished examples were not searched again
    assert resumed.examples == full.examples
    assert resumed.summary == full.summary


def test_resume_refuses_other_settings(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], tmp_path: Path
) -> None:
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    journal = tmp_path / "j.jsonl"
    auditor.scan([0, 1], max_units=5, journal=journal)
    with pytest.raises(MemauditError, match=r"other settings \(max_units: 5 then, 6 now\)"):
        auditor.scan([0, 1], max_units=6, journal=journal, resume=True)
    with pytest.raises(MemauditError, match=r"precision: float32 then, bf16 now"):
        auditor.scan([0, 1], max_units=5, precision="bf16", journal=journal, resume=True)
    journal.write_text('{"format": "something else"}\n')
    with pytest.raises(MemauditError, match="is not a scan journal of this memaudit"):
        auditor.scan([0, 1], max_units=5, journal=journal, resume=True)


def test_bad_settings_and_ids(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    with pytest.raises(MemauditError, match="unknown scorer"):
        auditor.scan([0], scorer="nope")
    with pytest.raises(MemauditError, match="max_units"):
        auditor.scan([0], max_units=0)
    with pytest.raises(MemauditError, match="out of range"):
        auditor.scan([40])
    with pytest.raises(MemauditError, match="no flagged ids"):
        auditor.scan([])


def test_report_round_trips_and_summary_is_consistent(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], tmp_path: Path
) -> None:
    model, data, test = tiny
    report = Auditor(model, data, test, device="cpu").scan(list(range(6)), max_units=20)
    path = report.to_json(tmp_path / "scan.json")
    again = ScanReport.from_json(path)
    assert again == report
    raw = json.loads(path.read_text())
    assert raw["kind"] == "scan" and raw["examples"][0]["status"] in {s.value for s in Status}
    s = report.summary
    assert s.n_flipped + s.n_budget_exhausted + s.n_misclassified == s.n_flagged
    assert sum(c.count for c in s.units_per_layer) == sum(
        e.n_units_minimal for e in report.examples if e.flipped
    )
    assert sum(s.depth_deciles) == pytest.approx(1.0 if s.n_flipped else 0.0)
    assert report.model.n_units == sum(c.count for c in report.model.units_per_layer)


def test_exact_reference_mode(tiny: tuple[nn.Module, ImageDataset, ImageDataset]) -> None:
    """The authors' per-example reference term: batched equals one-at-a-time, and the first
    step (nothing zeroed yet, so both terms coincide) picks the same unit as the shared mode."""
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    ids = list(range(6))
    options = {"max_units": 20, "reference_size": 8, "prune": False}
    batched = auditor.scan(ids, reference_mode="exact", batch_size=6, **options)
    single = auditor.scan(ids, reference_mode="exact", batch_size=1, **options)
    shared = auditor.scan(ids, **options)
    assert batched.summary.n_flipped >= 3
    assert _units(batched) == _units(single)
    assert [u[:1] for u in _units(batched)] == [u[:1] for u in _units(shared)]
    with pytest.raises(MemauditError, match="reference_mode"):
        auditor.scan(ids, reference_mode="approximate")


def test_refreshed_reference_mode(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Examples that flip within ``shared_units`` keep the shared answer; the others are searched
    again with the reference term recomputed after 1, 2, 4, ... units; batched = one at a time."""
    model, data, _ = tiny
    auditor = Auditor(model, data, device="cpu")
    ids = list(range(8))
    options = {"max_units": 20, "reference_size": 8, "prune": False}
    shared = auditor.scan(ids, reference_mode="shared", **options)
    refreshed = auditor.scan(ids, reference_mode="refreshed", shared_units=2, **options)
    short = [i for i, e in enumerate(shared.examples) if e.flipped and e.n_units <= 2]
    assert short and len(short) < len(ids)  # both paths run
    assert [_units(refreshed)[i] for i in short] == [_units(shared)[i] for i in short]
    everything = auditor.scan(ids, reference_mode="refreshed", shared_units=20, **options)
    assert _units(everything) == _units(shared)

    seen: list[int] = []
    exact = localize.exact_reference_grad

    def spy(*args: Any) -> torch.Tensor:
        seen.extend(int(n) for n in (args[2] == 0).sum(1).unique())
        return exact(*args)

    monkeypatch.setattr(localize._search, "exact_reference_grad", spy)
    batched = auditor.scan(ids, reference_mode="refreshed", shared_units=0, **options)
    single = auditor.scan(ids, reference_mode="refreshed", shared_units=0, batch_size=1, **options)
    assert _units(batched) == _units(single)
    assert seen and set(seen) <= {1, 2, 4, 8, 16}


def test_exact_reference_gradients_are_reused_across_calls(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """A mask seen before (in an earlier chunk) takes its gradient from the cache: the same
    values, and no forward for it; a cache with no room computes everything."""
    model, data, _ = tiny
    classifier = Auditor(model, data, device="cpu").model.eval()
    space = classifier.units()
    ref = torch.arange(3, 11)
    reference = Reference(data.batch(ref, "cpu"), data.labels[ref])
    first = torch.ones(3, space.total)
    first[1, :2], first[2, 5] = 0, 0
    second = torch.stack([first[2], first[0], torch.ones(space.total)])
    second[2, 7] = 0
    rows: list[int] = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: rows.append(len(o)))
    with UnitMasks(classifier.net, space) as masks:
        cold = exact_reference_grad(classifier, masks, first, reference)
        rows.clear()
        warm = exact_reference_grad(classifier, masks, second, reference)
        seen = sum(rows)
        full = Reference(reference.x, reference.y, cache_bytes=0)
        fresh = exact_reference_grad(classifier, masks, second, full)
    handle.remove()
    assert seen == len(ref)  # only the new mask ran
    torch.testing.assert_close(warm[:2], cold[[2, 0]])
    torch.testing.assert_close(warm, fresh)
    assert not full.cache and len(reference.cache) == 4


def test_equal_edits_are_evaluated_once(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """Edits that zero the same units (in any order) share one evaluation, with each edit's own
    accuracy as when evaluated alone."""
    model, data, _ = tiny
    classifier = Auditor(model, data, device="cpu").model.eval()
    rows_seen: list[int] = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: rows_seen.append(len(o)))
    rows, cpu = torch.arange(12), torch.device("cpu")
    with UnitMasks(classifier.net, classifier.units()) as masks:
        together = localize.edited_accuracy(
            classifier, masks, [[0, 3], [9], [3, 0]], data, rows, device=cpu
        )
        shared = sum(rows_seen)
        alone = [
            localize.edited_accuracy(classifier, masks, [s], data, rows, device=cpu)[0]
            for s in ([0, 3], [9])
        ]
    handle.remove()
    assert shared == 2 * len(rows)
    torch.testing.assert_close(together, torch.stack([alone[0], alone[1], alone[0]]))


def test_exact_reference_term_is_the_gradient_of_the_whole_objective(
    tiny: tuple[nn.Module, ImageDataset, ImageDataset],
) -> None:
    """In exact mode an example's score (the scorer's target term plus the weighted exact
    reference term, as the search adds them) is d/dm of its whole objective at its own mask
    (checked against autograd on one example with some units already zeroed)."""
    model, data, _ = tiny
    classifier = Auditor(model, data, device="cpu").model.eval()
    space = classifier.units()
    x, y = data.batch(torch.arange(3), "cpu"), data.labels[:3]
    ref = torch.arange(3, 11)
    ref_x, ref_y = data.batch(ref, "cpu"), data.labels[ref]
    mask = torch.ones(3, space.total)
    mask[1, :5] = 0
    settings = scan_settings(reference_size=8, reference_mode="exact")
    with UnitMasks(classifier.net, space) as masks:
        ref_grad = exact_reference_grad(classifier, masks, mask, Reference(ref_x, ref_y))
        ctx = ScoreContext(classifier, masks, x, y, mask, settings, torch.arange(len(y)), 0)
        scores = SCORERS["grad-x-act"](ctx).scores + settings.reference_weight * ref_grad
        one = mask[1:2].clone().requires_grad_(True)
        with masks.applied(one.expand(1 + len(ref), -1)):
            logits = classifier(torch.cat([x[1:2], ref_x]))
        objective = -F.cross_entropy(logits[:1], y[1:2]) + F.cross_entropy(logits[1:], ref_y)
        (expected,) = torch.autograd.grad(objective, one)
    torch.testing.assert_close(scores[1], expected[0], rtol=1e-4, atol=1e-6)
