"""The unlearning methods and their registry: each takes an :class:`UnlearnJob` (a copy of the
model it may change, the data, flagged and retained rows, a budget) and returns the model."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memaudit.data import ImageDataset
from memaudit.dropout import TiedDropout, conv_layers, mlp_hidden_layers
from memaudit.engine import EpochEnd, Mixed, fit, logits_of, pick_device
from memaudit.errors import MemauditError
from memaudit.localize import flip_units
from memaudit.membership import logit_margins, margins
from memaudit.models import FAMILIES, Classifier, build_model
from memaudit.schema import Recipe
from memaudit.units import zero_unit_weights

Option = float | int | str | bool


@dataclass(frozen=True)
class UnlearnJob:
    """What an unlearning method receives. ``model`` is a copy that the method may change."""

    model: Classifier
    train: ImageDataset
    flagged: torch.Tensor
    retained: torch.Tensor
    epochs: int
    lr: float
    batch_size: int
    seed: int
    device: torch.device
    recipe: Recipe
    options: Mapping[str, Option] = field(default_factory=dict)
    on_epoch: Callable[[EpochEnd], None] | None = None


@dataclass(frozen=True)
class UnlearnMethod:
    """An unlearning method: ``run(job) -> unlearned model`` and its default budget.

    ``epochs``: its default number of epochs (0: it does not train); a method that trains
    ``from_scratch`` trains for the retraining yardstick's epochs instead
    (:func:`~memaudit.unlearn.budget_epochs`) and registers 0.
    ``lr_scale``: its learning rate as a share of the training recipe's fine-tuning rate
    (``recipe.lr * recipe.finetune_lr_scale``), or of the training rate itself when it trains
    ``from_scratch``: the rates follow the model family (``memaudit.engine.RECIPES``).
    ``by_family``: defaults of one family over ``epochs`` and ``options``, e.g.
    ``{"transformer": {"epochs": 5, "p_gen": 0.7}}``.
    ``check(options, epochs)``: raises :class:`~memaudit.errors.MemauditError` for options
    (or a number of epochs) the method cannot run with; ``unlearn`` calls it before any work.
    """

    run: Callable[[UnlearnJob], Classifier]
    epochs: int
    lr_scale: float
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)
    from_scratch: bool = False
    by_family: Mapping[str, Mapping[str, Option]] = field(default_factory=dict)
    check: Callable[[Mapping[str, Option], int], None] | None = None

    def defaults(self, family: str) -> tuple[int, dict[str, Option]]:
        """The epochs and options of this method for a model of ``family``."""
        over = dict(self.by_family.get(family, {}))
        epochs = over.pop("epochs", self.epochs)
        return int(epochs), {**self.options, **over}

    def lr(self, recipe: Recipe) -> float:
        """The learning rate under ``recipe``."""
        base = recipe.lr if self.from_scratch else recipe.lr * recipe.finetune_lr_scale
        return base * self.lr_scale


METHODS: dict[str, UnlearnMethod] = {}


def register_method(name: str, method: UnlearnMethod) -> None:
    """Register an unlearning method; refuses to silently replace an existing one."""
    if name in METHODS:
        raise ValueError(f"unlearning method {name!r} is already registered")
    METHODS[name] = method


def number(options: Mapping[str, Option], name: str) -> float:
    """Option ``name`` as a float; a one-line error when it is not a number."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MemauditError(f"option {name} must be a number, got {value!r}")
    return float(value)


def within(
    options: Mapping[str, Option],
    name: str,
    low: float,
    high: float = math.inf,
    *,
    low_in: bool = False,
) -> None:
    """A one-line error unless option ``name`` is a number above ``low`` (or equal to it, with
    ``low_in``) and below ``high``."""
    value = number(options, name)
    if not (low <= value if low_in else low < value) or not value < high:
        above = f"{'>=' if low_in else '>'} {low:g}"
        shown = above if high == math.inf else f"in {'[' if low_in else '('}{low:g}, {high:g})"
        raise MemauditError(f"option {name} must be {shown}, got {value:g}")


def _fit(job: UnlearnJob, model: Classifier, rows: torch.Tensor, **kw: Any) -> Classifier:
    fit(
        model,
        job.train,
        rows,
        epochs=job.epochs,
        batch_size=job.batch_size,
        lr=job.lr,
        recipe=job.recipe,
        seed=job.seed,
        device=job.device,
        on_epoch=job.on_epoch,
        **kw,
    )
    return model.eval()


def _example_tied_dropout(job: UnlearnJob) -> Classifier:
    """Example-tied dropout unlearning: the drop network teaches the flagged rows.

    1. A copy of the model is fine-tuned with example-tied dropout for ``teacher_share`` of the
       epochs and folded in drop mode (:func:`_drop_network`): the memorization units are gone,
       and the flagged rows are predicted as by a model that did not memorize them.
    2. The model itself is fine-tuned on the retained rows, their labels, for the other epochs;
       each step adds ``forget_batch`` flagged rows (cycled) fit to the teacher's class
       probabilities, the given label's logit lowered by ``forget_shift`` times the model's
       median retained margin (the teacher trained on the flagged rows, and is surer of their
       labels than a model that never saw them), at ``forget_weight`` times the retained rows'
       loss, and ``hold_batch`` of the retained rows the teacher gets wrong (cycled) at their
       labels, at ``hold_weight``: what the model memorized of them is held while the flagged
       rows are pulled away. The step's weights are divided by their sum (``1 + forget_weight +
       hold_weight``), so the added rows do not make a step larger than the recipe's. The
       teacher's logits are first scaled so that its median margin on retained rows is the
       model's.
    3. The head is scaled back towards the model's confidence before: by ``r ** q``, ``r``
       being the factor that makes the median margin on retained rows the model's before and
       ``q`` the share of the flagged rows the teacher predicts as another class than their
       label (``calibrate="contradicted"``). A model retrained without flagged rows that
       contradicted the rest of the data is surer than the original; without ordinary images,
       it is not. ``calibrate=true``: by ``r``; a number: to that median margin; ``false``: no
       scaling. No scaling in 2 or 3 where a median margin is not positive.

    Why a teacher and not the drop network itself: the drop network forgets every example's
    memorization, the retained rows' as well (400 random clean ids flagged on the testbed: 88%
    of the retained rows kept, against retraining's 100%), and it is less sure of everything.
    ``distil=False`` exports the drop network (step 1 alone; the default of transformers and
    LayerNorm CNNs, where steps 2-3 were not measured).

    Step 1 ties only the flagged rows (``tie="flagged"``): what they need beyond the shared
    features goes to their memorization units, while the retained rows train the drop-mode
    network directly. ``p_gen`` of each layer is kept in drop mode; the layers go after every
    conv / linear layer (``layers="every"``; ``layers="mlp"``: the MLPs' hidden features only,
    which leaves a transformer's memorization in its residual stream).

    Every default here was measured: ``docs/example-tied-dropout.md`` has the figures and the
    variants tried, the README's unlearning sections the tables and their commands.
    """
    if not job.options.get("distil", True):
        return _drop_network(job)
    share, weight = float(job.options["teacher_share"]), float(job.options["forget_weight"])
    hold, size = float(job.options["hold_weight"]), int(job.options["forget_batch"])
    hold_size = int(job.options["hold_batch"])
    calibrate = job.options["calibrate"]
    first = min(job.epochs - 1, max(1, round(share * job.epochs)))
    dev = pick_device(job.device)
    gen = torch.Generator().manual_seed(job.seed)
    labels = job.train.labels
    order = torch.randperm(len(job.retained), generator=gen)[:1024]
    sample = job.retained[order]
    before = _median_margin(job.model, job.train, sample, dev)
    teacher = _drop_network(
        dataclasses.replace(
            job, model=copy.deepcopy(job.model), epochs=first, on_epoch=_progress(job, 0)
        )
    )
    if hold > 0:  # the rows to hold come from a pass over every retained row
        median, risky = _teacher_view(teacher, job.train, job.retained, order, dev)
    else:
        median, risky = _median_margin(teacher, job.train, sample, dev), job.retained[:0]
    scale = _ratio(before, median)
    taught = logits_of(teacher, job.train, job.flagged, device=dev).mul_(scale)
    contradicted = float((taught.argmax(1) != labels[job.flagged]).float().mean())
    shift = float(job.options["forget_shift"]) * (before or 0.0)
    taught[torch.arange(len(job.flagged)), labels[job.flagged]] -= shift
    taught = taught.softmax(1)
    del teacher
    where = torch.full((len(job.train),), -1, dtype=torch.long)
    where[job.flagged] = torch.arange(len(job.flagged))
    k = taught.shape[1]
    forget = cycled(job.flagged, min(size, len(job.flagged)), gen)
    held = cycled(risky, min(hold_size, len(risky)), gen) if len(risky) else None

    total = 1.0 + weight + (hold if held is not None else 0.0)  # the step's weights sum to 1

    def mix(batch: torch.Tensor) -> Mixed:
        parts = [(batch, 1.0, F.one_hot(labels[batch], k).float())]
        if held is not None:
            h = next(held)
            parts.append((h, hold, F.one_hot(labels[h], k).float()))
        f = next(forget)
        parts.append((f, weight, taught[where[f]]))
        shares = [torch.full((len(ids),), w / len(ids) / total) for ids, w, _ in parts]
        return Mixed(
            ids=torch.cat([ids for ids, _, _ in parts]),
            weights=torch.cat(shares),
            targets=torch.cat([t for _, _, t in parts]),
        )

    rest = dataclasses.replace(job, epochs=job.epochs - first, on_epoch=_progress(job, first))
    model = _fit(rest, job.model, job.retained, mix=mix)
    if calibrate is not False:
        target = before if calibrate in (True, "contradicted") else float(calibrate)
        factor = _ratio(target, _median_margin(model, job.train, sample, dev))
        if calibrate == "contradicted":
            factor = factor**contradicted
        _scale_logits(model, factor)
    return model


def _check_example_tied_dropout(options: Mapping[str, Option], epochs: int) -> None:
    if options["tie"] not in ("all", "flagged"):
        raise MemauditError(f"option tie must be 'all' or 'flagged', got {options['tie']!r}")
    if options["layers"] not in ("every", "mlp"):
        raise MemauditError(f"option layers must be 'every' or 'mlp', got {options['layers']!r}")
    p_gen, p_mem = number(options, "p_gen"), number(options, "p_mem")
    if not 0 < p_gen <= 1 or not 0 <= p_mem <= 1:
        raise MemauditError(
            f"options p_gen must be in (0, 1], p_mem in [0, 1]; got {p_gen:g}, {p_mem:g}"
        )
    if not options["distil"]:
        return
    share, weight = number(options, "teacher_share"), number(options, "forget_weight")
    hold, size = number(options, "hold_weight"), number(options, "forget_batch")
    hold_size = number(options, "hold_batch")
    calibrate = options["calibrate"]
    within(options, "forget_shift", 0.0, 1.0, low_in=True)
    if (
        calibrate != "contradicted"
        and not isinstance(calibrate, bool)
        and not (isinstance(calibrate, int | float) and calibrate > 0)
    ):
        raise MemauditError(
            f"option calibrate must be contradicted, true, false or a margin > 0, got {calibrate!r}"
        )
    if not 0 < share < 1 or min(weight, hold) < 0 or min(size, hold_size) < 1:
        raise MemauditError(
            "options teacher_share must be in (0, 1), forget_weight and hold_weight >= 0, "
            f"forget_batch and hold_batch >= 1; got {share:g}, {weight:g}, {hold:g}, {size:g} "
            f"and {hold_size:g}"
        )
    if epochs < 2:
        raise MemauditError(
            f"example-tied dropout needs at least 2 epochs (teacher, then distillation), got "
            f"{epochs}: raise --epochs / --budget, or --option distil=false"
        )


def _median_margin(
    model: Classifier, data: ImageDataset, rows: torch.Tensor, device: torch.device
) -> float | None:
    """The median logit margin of ``rows``' labels (:func:`~memaudit.membership.margins`);
    ``None`` when it is not positive: a model that gets most of them wrong has no confidence
    scale to keep."""
    return _positive(float(margins(model, data, rows, device=device).median()))


def _teacher_view(
    teacher: Classifier,
    data: ImageDataset,
    retained: torch.Tensor,
    sample: torch.Tensor,
    device: torch.device,
) -> tuple[float | None, torch.Tensor]:
    """In one pass over the ``retained`` rows: the teacher's median margin on
    ``retained[sample]`` (as :func:`_median_margin`) and the retained rows it mispredicts."""
    logits = logits_of(teacher, data, retained, device=device)
    labels = data.labels[retained]
    median = float(logit_margins(logits[sample], labels[sample]).median())
    return _positive(median), retained[logits.argmax(1) != labels]


def _positive(median: float) -> float | None:
    return median if median > 0 else None


def _ratio(a: float | None, b: float | None) -> float:
    """``a / b``, or 1 when either is unknown."""
    return a / b if a is not None and b is not None else 1.0


def _scale_logits(model: Classifier, factor: float) -> None:
    """Multiply the model's logits by ``factor``, in the last linear layer of its head."""
    head = model.info.head or ""
    found = model.net.get_submodule(head).modules() if head else iter(())
    linears = [m for m in found if isinstance(m, nn.Linear)]
    if not linears:
        raise MemauditError(
            f"the model's head {head!r} has no linear layer to calibrate: use --option distil=false"
        )
    with torch.no_grad():
        linears[-1].weight.mul_(factor)
        if linears[-1].bias is not None:
            linears[-1].bias.mul_(factor)


def _progress(job: UnlearnJob, done: int) -> Callable[[EpochEnd], None] | None:
    """``job.on_epoch`` for a stage that starts after ``done`` of the job's epochs."""
    report = job.on_epoch
    if report is None:
        return None
    return lambda end: report(dataclasses.replace(end, epoch=done + end.epoch, epochs=job.epochs))


def cycled(rows: torch.Tensor, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Batches of ``size`` of ``rows`` without end, each pass in a new seeded order."""
    while True:
        yield from rows[torch.randperm(len(rows), generator=gen)].split(size)


def _drop_network(job: UnlearnJob) -> Classifier:
    """Fine-tune with example-tied dropout on all rows, then drop the memorization units."""
    model = job.model
    tie, layers = job.options["tie"], job.options["layers"]
    after = conv_layers(model) if layers == "every" else mlp_hidden_layers(model)
    if not after:
        raise MemauditError("the model has no MLP activations to drop; use layers=every")
    etd = TiedDropout(
        model,
        after=after,
        p_gen=float(job.options["p_gen"]),
        p_mem=float(job.options["p_mem"]),
        seed=job.seed,
    )
    flagged = torch.zeros(len(job.train), dtype=torch.bool)
    flagged[job.flagged] = True
    with etd.attached() as masks:

        def tied(ids: torch.Tensor) -> AbstractContextManager[torch.Tensor]:
            return masks.applied(etd.masks(ids, tied=flagged[ids] if tie == "flagged" else None))

        _fit(job, model, torch.arange(len(job.train)), around_batch=tied)
    etd.fold("drop")
    return model.eval()


def _finetune(job: UnlearnJob) -> Classifier:
    """Fine-tune on the retained rows only."""
    return _fit(job, job.model, job.retained)


def _gradient_ascent(job: UnlearnJob) -> Classifier:
    """Raise the loss on the flagged rows by plain SGD (batch-norm statistics frozen).

    Ascent diverges within a few steps once the flagged rows are no longer fit (measured: the
    testbed model collapses to chance between 8 and 12 steps at lr 0.01), so it stops as soon as
    a batch's loss passes ``stop_loss`` (default: ln K, the loss of a uniform guess).
    """
    stop = float(job.options.get("stop_loss", 0) or math.log(max(2, job.model.info.num_classes)))
    return _fit(
        job,
        job.model,
        job.flagged,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        mode="eval",  # BN statistics stay those of all the data
        ascend=True,
        stop_loss=stop,
    )


def _zero_units(job: UnlearnJob) -> Classifier:
    """Zero the units whose removal flips each flagged example (``memaudit.localize``)."""
    per_row = flip_units(job.model, job.train, job.flagged, device=job.device)
    flat = sorted({int(u) for units in per_row for u in units})
    if flat:
        zero_unit_weights(job.model.net, job.model.units(), flat)
    return job.model.eval()


def fresh_copy(model: Classifier, *, seed: int | None = None) -> Classifier:
    """The same architecture and info with newly initialized weights: rebuilt from its family
    (timm, memaudit) or config (Hugging Face); else a copy whose modules reset their parameters.
    With ``seed``, drawn from it (the caller's random state is left as it was)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fresh_copy(model)
    family = model.info.arch.partition(":")[0]
    if family in FAMILIES and family != "hf":
        fresh = build_model(
            model.info.arch,
            num_classes=model.info.num_classes,
            in_chans=model.info.in_chans or 3,
            config=model.info.arch_config,
        )
        fresh.info = model.info.model_copy()
        return fresh
    if callable(getattr(model.net, "post_init", None)):  # Hugging Face: its own initialization,
        # the class token and position embeddings included (no reset_parameters holds them)
        net = type(model.net)(copy.deepcopy(model.net.config))
        return Classifier(net, model.info.model_copy(), model.preprocess_origin)
    fresh = copy.deepcopy(model)
    for module in fresh.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def _retrain(job: UnlearnJob) -> Classifier:
    """Train the architecture from scratch on the retained rows (the gold standard; slow). The
    initialization is drawn with the job's seed; the caller's random state is left as it was."""
    return _fit(job, fresh_copy(job.model, seed=job.seed), job.retained)


register_method(
    "example-tied-dropout",
    UnlearnMethod(
        _example_tied_dropout,
        epochs=5,
        lr_scale=1.0,
        description="example-tied dropout's drop network teaches the flagged rows to the model",
        options={
            "p_gen": 0.5,
            "p_mem": 0.1,
            "tie": "flagged",
            "layers": "every",
            "distil": True,
            "teacher_share": 0.5,
            "forget_weight": 0.3,
            "forget_batch": 32,
            "forget_shift": 0.4,
            "hold_weight": 0.1,
            "hold_batch": 32,
            "calibrate": "contradicted",
        },
        by_family={
            "transformer": {"epochs": 16, "p_gen": 0.7, "distil": False},
            "layernorm-cnn": {"epochs": 8, "p_gen": 0.5, "distil": False},
        },
        check=_check_example_tied_dropout,
    ),
)
register_method(
    "finetune",
    UnlearnMethod(_finetune, epochs=5, lr_scale=1.0, description="fine-tune on retained"),
)
register_method(
    "gradient-ascent",
    UnlearnMethod(
        _gradient_ascent,
        epochs=5,
        lr_scale=0.2,
        description="ascend the flagged loss until it passes stop_loss (0: ln K)",
        options={"stop_loss": 0.0},
        check=lambda options, epochs: within(options, "stop_loss", 0.0, low_in=True),
    ),
)
register_method(
    "zero-units",
    UnlearnMethod(_zero_units, epochs=0, lr_scale=1.0, description="zero the units scan localizes"),
)
register_method(
    "retrain",
    UnlearnMethod(
        _retrain,
        epochs=0,
        lr_scale=1.0,
        description="retrain from scratch on retained",
        from_scratch=True,
    ),
)
