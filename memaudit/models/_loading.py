"""Loading any model memaudit understands (:func:`load_model`) and saving memaudit checkpoints
(:func:`save_model`)."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memaudit.errors import MemauditError
from memaudit.models._classifier import Classifier, DataRef, ModelInfo, Preprocess
from memaudit.models._families import FAMILIES, Expected, build_model
from memaudit.units import UnitSpace, last_unit_layer

CHECKPOINT_FORMAT = "memaudit-checkpoint/1"
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def load_model(
    source: str | os.PathLike[str] | nn.Module,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
) -> Classifier:
    """Load a classifier in eval mode from any source memaudit understands.

    Sources: an ``nn.Module``; ``timm:NAME`` (fresh, or hub weights with ``pretrained``);
    ``hf:ORG/NAME`` (hub); a Hugging Face ``save_pretrained`` directory; a memaudit checkpoint;
    a state-dict file (``.pt``/``.pth``/``.bin``/``.safetensors``) with ``arch``; a pickled
    ``nn.Module`` only with ``trust_pickle=True`` (unpickling runs arbitrary code).

    Example:
        >>> model = load_model("timm:resnet18", num_classes=10, in_chans=1)
        >>> model.info.num_classes, model(torch.zeros(2, 1, 32, 32)).shape
        (10, torch.Size([2, 10]))
    """
    if isinstance(source, Classifier):
        return source.eval()
    if isinstance(source, nn.Module):
        return _wrap_module(source, "module").eval()
    text = os.fspath(source)
    if text.startswith("hf:") and not Path(text).exists():
        return build_model(text, num_classes=num_classes or 0, pretrained=True, source=text)
    if text.startswith(tuple(f"{p}:" for p in FAMILIES)) and not Path(text).exists():
        return build_model(
            text,
            num_classes=num_classes or 1000,
            in_chans=in_chans or 3,
            pretrained=pretrained,
            source=text,
        )
    path = Path(text)
    if not path.exists():
        raise MemauditError(
            f"model {text!r} not found: give an existing file or directory, or an architecture "
            "such as timm:resnet18"
        )
    if path.is_dir():
        return _load_hf_dir(path)
    if path.suffix not in _STATE_DICT_SUFFIXES:
        raise MemauditError(
            f"{path} is not a model file memaudit reads; use .pt, .pth, .bin or .safetensors"
        )
    payload, meta = read_weights(path, trust_pickle=trust_pickle)
    if isinstance(payload, Classifier):
        return payload.eval()
    if isinstance(payload, nn.Module):
        return _wrap_module(payload, str(path)).eval()
    if meta is not None:
        return _from_checkpoint(path, payload, meta)
    if arch is None:
        raise MemauditError(
            f"{path} holds a bare state dict: name its architecture with --arch / arch= "
            "(e.g. --arch timm:resnet18)"
        )
    return _from_state_dict(path, payload, arch, num_classes=num_classes, in_chans=in_chans)


def _wrap_module(net: nn.Module, source: str) -> Classifier:
    head = last_unit_layer(net)
    head_module = net.get_submodule(head) if head else None
    out = getattr(head_module, "out_features", None) or getattr(head_module, "out_channels", 0)
    info = ModelInfo(
        source=source, arch=f"module:{type(net).__name__}", num_classes=int(out or 0), head=head
    )
    return Classifier(net, info)


def read_weights(
    path: Path, *, trust_pickle: bool
) -> tuple[dict[str, torch.Tensor] | nn.Module, dict[str, Any] | None]:
    """Tensors (or a trusted pickled module) and memaudit metadata, if the file has any.

    Only with ``trust_pickle`` may a ``.pt`` file unpickle Python objects (that runs code)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise MemauditError(f"{path} is not a readable safetensors file ({err})") from None
        meta = json.loads(header["memaudit"]) if "memaudit" in header else None
        return tensors, meta
    try:  # torch's warnings on a file it then cannot read would only bury the error
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names the class it refused; other failures are corruption.
        if trust_pickle or "Unsupported global" not in str(err):
            raise _unreadable(path, err) from None
        raise MemauditError(
            f"{path} holds pickled Python objects, and unpickling runs arbitrary code; if you "
            "trust the file, pass --trust-pickle (trust_pickle=True)"
        ) from None
    except Exception as err:  # torch.load fails in many ways on a damaged file
        raise _unreadable(path, err) from None
    for warning in said:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"], json.loads(obj["memaudit"])
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, None
    raise MemauditError(
        f"{path} holds neither a state dict nor a model; save one with torch.save(model."
        "state_dict(), path)"
    )


def _unreadable(path: Path, err: BaseException) -> MemauditError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return MemauditError(
        f"{path} is not a readable PyTorch checkpoint ({detail}); check the file is complete"
    )


def _load_hf_dir(path: Path) -> Classifier:
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would clutter the CLI's stderr

    if not (path / "config.json").exists():
        raise MemauditError(
            f"{path} is a directory without config.json; give a Hugging Face save_pretrained "
            "directory or a checkpoint file"
        )
    try:
        net = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MemauditError(f"{path} is not a loadable image classifier ({err})") from None
    family = FAMILIES["hf"]
    in_chans = int(getattr(net.config, "num_channels", 3))
    labels = getattr(net.config, "id2label", None) or {}
    expected = _hf_dir_preprocess(path) or family.preprocess(net, in_chans, False)
    info = ModelInfo(
        source=str(path),
        arch=f"hf:{net.config.model_type}",
        num_classes=int(net.config.num_labels),
        in_chans=in_chans,
        preprocess=expected[0] if expected else None,
        class_names=[str(labels[i]) for i in sorted(labels)] if labels else None,
        head=family.head(net),
        arch_config=family.config(net),
    )
    return Classifier(net, info, expected[1] if expected else "").eval()


def _hf_dir_preprocess(path: Path) -> Expected | None:
    file = path / "preprocessor_config.json"
    if not file.exists():
        return None
    cfg = json.loads(file.read_text())
    size = cfg.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    origin = f"{file.name} beside the model"
    if mean is None or std is None:
        return Preprocess(image_size=size), origin
    return Preprocess(image_size=size, mean=tuple(mean), std=tuple(std)), origin


def _from_checkpoint(
    path: Path, state: Mapping[str, torch.Tensor], meta: dict[str, Any]
) -> Classifier:
    info = ModelInfo.model_validate(meta)
    model = build_model(
        info.arch,
        num_classes=info.num_classes,
        in_chans=info.in_chans or 3,
        config=info.arch_config,
        source=str(path),
    )
    _load_state(model.net, state, path, info.arch)
    model.info = info.model_copy(update={"source": str(path)})
    if info.preprocess is not None:
        model.preprocess_origin = "recorded in the memaudit checkpoint"
    return model.eval()


def _from_state_dict(
    path: Path,
    state: Mapping[str, torch.Tensor],
    arch: str,
    *,
    num_classes: int | None,
    in_chans: int | None,
) -> Classifier:
    probe = build_model(arch, num_classes=num_classes or 10, in_chans=in_chans or 3)
    state = _strip_prefix(state, probe.net)
    found_classes, found_chans = _shapes_from_state(probe, state)
    for name, given, found in (
        ("num_classes", num_classes, found_classes),
        ("in_chans", in_chans, found_chans),
    ):
        if given is not None and found is not None and given != found:
            raise MemauditError(
                f"{path} was trained with {name}={found} but {name}={given} was given; "
                f"drop the option or pass {found}"
            )
    model = build_model(
        arch,
        num_classes=num_classes or found_classes or 1000,
        in_chans=in_chans or found_chans or 3,
        source=str(path),
    )
    _load_state(model.net, state, path, arch)
    return model.eval()


def _shapes_from_state(
    probe: Classifier, state: Mapping[str, torch.Tensor]
) -> tuple[int | None, int | None]:
    """(num_classes, in_chans) read off the head and first-convolution weights of ``state``."""
    head = probe.info.head
    head_layers = [
        name
        for name in UnitSpace(probe.net).counts()
        if name == head or name.startswith(f"{head}.")
    ]  # an HF head may be a Sequential holding the Linear
    head_weight = state.get(f"{head_layers[-1]}.weight") if head_layers else None
    first_conv = next((k for k, v in probe.net.state_dict().items() if v.ndim == 4), None)
    conv_weight = state.get(first_conv) if first_conv else None
    classes = int(head_weight.shape[0]) if head_weight is not None else None
    chans = int(conv_weight.shape[1]) if conv_weight is not None else None
    return classes, chans


def _strip_prefix(state: Mapping[str, torch.Tensor], net: nn.Module) -> Mapping[str, torch.Tensor]:
    """Drop the ``net.`` (a saved :class:`Classifier`) or ``module.`` (DataParallel) prefix."""
    own = net.state_dict().keys()
    for prefix in ("net.", "module."):
        if state and all(k.startswith(prefix) for k in state) and not any(k in own for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_state(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    try:
        result = net.load_state_dict(dict(state), strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        shapes = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise MemauditError(
            f"{path} does not match architecture {arch}: "
            f"{shapes[0] if shapes else 'tensor shapes differ'}; check --arch and its options"
        ) from None
    problems = [*result.missing_keys, *result.unexpected_keys]
    if problems:
        raise MemauditError(
            f"{path} does not match architecture {arch}: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {problems[0]!r}); check --arch"
        )


def save_model(
    model: Classifier,
    path: str | os.PathLike[str],
    *,
    train_data: DataRef | None = None,
    preprocess: Preprocess | None = None,
) -> Path:
    """Write a memaudit checkpoint: weights plus :class:`ModelInfo`, reloadable with no flags.

    ``train_data`` and ``preprocess`` (the data the model was measured on, and how its images
    were shown to it) replace the model's own when given. ``.safetensors`` (recommended) stores
    the info as header metadata; ``.pt`` stores tensors and strings only, so it loads with
    ``torch.load(weights_only=True)``.
    """
    out = Path(path)
    if train_data is not None and Path(train_data.source).exists():  # reloads from any folder
        train_data = train_data.model_copy(
            update={"source": str(Path(train_data.source).resolve())}
        )
    update = {"train_data": train_data, "preprocess": preprocess}
    info = model.info.model_copy(update={k: v for k, v in update.items() if v is not None})
    if info.arch.split(":")[0] not in FAMILIES:
        raise MemauditError(
            f"cannot save a {info.arch} model as a memaudit checkpoint: its architecture is not "
            "in a registered family; save its state_dict and reload it with --arch"
        )
    meta = info.model_dump_json()
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(
            _unshare(state), str(out), metadata={"memaudit": meta, "format": CHECKPOINT_FORMAT}
        )
    else:
        torch.save({"format": CHECKPOINT_FORMAT, "memaudit": meta, "state_dict": state}, out)
    return out


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store copies."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        ptr = value.untyped_storage().data_ptr()
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out
