"""Model families behind ``family:name`` sources (timm, Hugging Face, memaudit's nets): how to
build each, find its head and the inputs its weights expect; :func:`build_model`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from memaudit.errors import MemauditError
from memaudit.models._classifier import Classifier, Expected, ModelInfo, Preprocess
from memaudit.units import last_unit_layer


@dataclass(frozen=True)
class Family:
    """How to build and describe the models of one family (``prefix:name`` sources)."""

    build: Callable[..., nn.Module]  # (name, *, num_classes, in_chans, config, pretrained)
    head: Callable[[nn.Module], str | None]
    # (net, in_chans, pretrained): the inputs these weights expect and why; None: any size
    preprocess: Callable[[nn.Module, int, bool], Expected | None]
    config: Callable[[nn.Module], dict[str, Any]]


FAMILIES: dict[str, Family] = {}


def register_family(prefix: str, family: Family) -> None:
    """Register a model family; refuses to silently replace an existing one."""
    if prefix in FAMILIES:
        raise ValueError(f"model family {prefix!r} is already registered")
    FAMILIES[prefix] = family


def _module_name(net: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, m in net.named_modules() if m is target and name), None)


def _timm_build(
    name: str, *, num_classes: int, in_chans: int, config: dict[str, Any], pretrained: bool
) -> nn.Module:
    import timm

    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **config
        )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise MemauditError(
                f"timm has no architecture {name!r}; see timm.list_models() for names"
            ) from None
        raise
    except (OSError, ValueError) as err:
        if not pretrained:
            raise
        raise _hub_error(f"timm:{name}", err) from None


def _timm_head(net: nn.Module) -> str | None:
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    return _module_name(net, head if isinstance(head, nn.Module) else None)


def _timm_preprocess(net: nn.Module, in_chans: int, pretrained: bool) -> Expected | None:
    """timm's data config only for timm's own pretrained weights; else a fixed size, if any.

    Weights trained elsewhere (a state dict) were not trained at timm's 224x224 ImageNet
    setting: a CNN keeps the data's size, a token model (ViT) its configured ``img_size``.
    """
    import timm.data

    if pretrained:
        cfg = timm.data.resolve_data_config({}, model=net)
        origin = "timm's data config of its pretrained weights"
        size, mean, std = int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != in_chans:  # timm's ImageNet statistics do not fit a 1-channel model
            return Preprocess(image_size=size), origin
        return Preprocess(image_size=size, mean=mean, std=std), origin
    img_size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if img_size:
        size = img_size if isinstance(img_size, int) else img_size[-1]
        return Preprocess(image_size=int(size)), "the model's configured img_size"
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        return Preprocess(image_size=int(cfg["input_size"][-1])), "the model's fixed input size"
    return None


def _hf_build(
    name: str, *, num_classes: int, in_chans: int, config: dict[str, Any], pretrained: bool
) -> nn.Module:
    from transformers import AutoConfig, AutoModelForImageClassification

    if pretrained:
        try:
            return AutoModelForImageClassification.from_pretrained(name)
        except OSError as err:
            raise _hub_error(f"hf:{name}", err) from None
    cfg = dict(config)
    cfg.setdefault("num_channels", in_chans)
    model_type = cfg.pop("model_type", name)
    hf_config = AutoConfig.for_model(model_type, **cfg)
    hf_config.num_labels = num_classes
    return AutoModelForImageClassification.from_config(hf_config)


def _hf_head(net: nn.Module) -> str | None:
    head = getattr(net, "classifier", None)
    return _module_name(net, head) if isinstance(head, nn.Module) else last_unit_layer(net)


def _hf_preprocess(net: nn.Module, in_chans: int, pretrained: bool) -> Expected | None:
    size = getattr(getattr(net, "config", None), "image_size", None)
    if not isinstance(size, int):
        return None
    return Preprocess(image_size=size), "the model config's image_size"


def _hf_config(net: nn.Module) -> dict[str, Any]:
    config: dict[str, Any] = net.config.to_dict()  # type: ignore[union-attr, operator]
    # Label maps are rebuilt from num_classes; keys must not turn into strings twice.
    for key in ("id2label", "label2id", "transformers_version", "architectures"):
        config.pop(key, None)
    return config


def _memaudit_build(
    name: str, *, num_classes: int, in_chans: int, config: dict[str, Any], pretrained: bool
) -> nn.Module:
    from memaudit.nets import NETS

    if pretrained:
        raise MemauditError(f"memaudit:{name} has no pretrained weights; train it with testbed")
    if name not in NETS:
        raise MemauditError(f"memaudit has no architecture {name!r}; choose from {sorted(NETS)}")
    return NETS[name](num_classes=num_classes, in_chans=in_chans, **config)


register_family(
    "timm",
    Family(
        build=_timm_build,
        head=_timm_head,
        preprocess=_timm_preprocess,
        config=lambda net: {},
    ),
)
register_family(
    "hf",
    Family(build=_hf_build, head=_hf_head, preprocess=_hf_preprocess, config=_hf_config),
)
register_family(
    "memaudit",
    Family(
        build=_memaudit_build,
        head=lambda net: "fc",
        preprocess=lambda net, in_chans, pretrained: None,
        config=lambda net: dict(getattr(net, "config", {})),
    ),
)


def _hub_error(source: str, err: BaseException) -> MemauditError:
    from huggingface_hub import constants

    offline = os.environ.get("HF_HUB_OFFLINE", "0")
    return MemauditError(
        f"could not fetch {source} from the hub or find it in the cache {constants.HF_HUB_CACHE} "
        f"(HF_HUB_OFFLINE={offline}): download it on a machine with network access into that "
        f"cache, or pass a local checkpoint ({type(err).__name__})"
    )


def _split_arch(arch: str) -> tuple[str, str]:
    prefix, sep, name = arch.partition(":")
    if not sep or prefix not in FAMILIES or not name:
        raise MemauditError(
            f"unknown architecture {arch!r}; use one of "
            + ", ".join(f"'{p}:NAME'" for p in FAMILIES)
            + " (e.g. timm:resnet18)"
        )
    return prefix, name


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    config: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Classifier:
    """Build ``arch`` (``family:name``) with fresh weights (or hub weights when ``pretrained``)."""
    prefix, name = _split_arch(arch)
    family = FAMILIES[prefix]
    cfg = dict(config or {})
    try:
        net = family.build(
            name, num_classes=num_classes, in_chans=in_chans, config=cfg, pretrained=pretrained
        )
    except (TypeError, ValueError) as err:
        if not cfg:
            raise
        raise MemauditError(
            f"cannot build {arch} with options {cfg} ({err}); check the architecture's options"
        ) from None
    hf_config: Any = getattr(net, "config", None)
    expected = family.preprocess(net, in_chans, pretrained)
    if prefix == "hf" and pretrained:
        num_classes = int(hf_config.num_labels)
        in_chans = int(getattr(hf_config, "num_channels", in_chans))
    info = ModelInfo(
        source=source or arch,
        arch=arch,
        num_classes=num_classes,
        in_chans=in_chans,
        preprocess=expected[0] if expected else None,
        head=family.head(net),
        arch_config=cfg if prefix != "hf" else family.config(net),
    )
    if prefix == "hf":
        labels = getattr(hf_config, "id2label", None)
        if pretrained and isinstance(labels, dict):
            info.class_names = [str(labels[i]) for i in sorted(labels)]
    return Classifier(net, info, expected[1] if expected else "").eval()
