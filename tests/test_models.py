"""load_model / save_model: every source, round trips and the clear errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import HF_KINDS, save_hf, tiny_cnn
from safetensors.torch import save_file
from torch import nn

from memaudit.errors import MemauditError
from memaudit.models import (
    FAMILIES,
    Classifier,
    DataRef,
    Family,
    Preprocess,
    build_model,
    load_model,
    register_family,
    save_model,
)
from memaudit.models._loading import _shapes_from_state

TIMM_TINY = ("timm:test_resnet", "timm:test_convnext", "timm:test_vit")


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --- architectures by name -------------------------------------------------------------------


@pytest.mark.parametrize("arch", TIMM_TINY)
def test_timm_name_builds_classifier(arch: str) -> None:
    model = load_model(arch, num_classes=5, in_chans=1)
    assert isinstance(model, Classifier) and not model.training
    assert model.info.arch == arch and model.info.num_classes == 5 and model.info.in_chans == 1
    assert model.info.head is not None
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_timm_pretrained_keeps_timm_data_config_only_when_channels_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import timm

    real = timm.create_model

    def offline(name: str, *, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        return real(name, pretrained=False, **kw)  # the hub weights, mocked: no download

    monkeypatch.setattr(timm, "create_model", offline)
    rgb = load_model("timm:resnet18", num_classes=3, in_chans=3, pretrained=True)
    gray = load_model("timm:resnet18", num_classes=3, in_chans=1, pretrained=True)
    assert rgb.info.preprocess == Preprocess(
        image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    assert gray.info.preprocess == Preprocess(image_size=224)  # ImageNet stats need 3 channels
    assert "pretrained" in rgb.preprocess_origin


def test_timm_weights_of_unknown_origin_get_no_pretrained_data_config() -> None:
    cnn = load_model("timm:resnet18", num_classes=3, in_chans=1)
    vit = load_model("timm:test_vit", num_classes=3, in_chans=1)  # configured at 160
    small_vit = build_model("timm:test_vit", num_classes=3, in_chans=1, config={"img_size": 32})
    assert cnn.info.preprocess is None  # any size: the data keeps its own
    assert vit.info.preprocess == Preprocess(image_size=160)
    assert small_vit.info.preprocess == Preprocess(image_size=32)
    assert "img_size" in small_vit.preprocess_origin


def test_memaudit_net_builds() -> None:
    model = load_model("memaudit:resnet9", num_classes=4, in_chans=1)
    assert model.info.head == "fc"
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("timm:no_such_net", "timm has no architecture"),
        ("memaudit:nonet", "memaudit has no architecture"),
    ],
)
def test_unknown_architecture_is_clear(source: str, message: str) -> None:
    with pytest.raises(MemauditError, match=message):
        load_model(source, num_classes=2)


def test_unknown_family_is_clear() -> None:
    with pytest.raises(MemauditError, match="unknown architecture"):
        build_model("keras:resnet", num_classes=2)


def test_family_registry_refuses_overwrite() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_family("timm", FAMILIES["timm"])
    assert isinstance(FAMILIES["timm"], Family)


# --- Hugging Face save_pretrained directories --------------------------------------------------


@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_directory_loads_and_returns_logits(kind: str, hf_dirs: dict[str, Path]) -> None:
    model = load_model(hf_dirs[kind])
    assert model.info.arch == f"hf:{kind}" and model.info.num_classes == 4
    assert model.info.class_names == ["class0", "class1", "class2", "class3"]
    out = model(torch.randn(2, 3, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)


def test_hf_directory_loads_quietly(
    hf_dirs: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    load_model(hf_dirs["resnet"])
    assert capfd.readouterr().err == ""  # no progress bar on the CLI's stderr


def test_hf_directory_preprocessing_from_processor_config(tmp_path: Path) -> None:
    model = load_model(save_hf("vit", tmp_path / "vit", processor=True))
    assert model.info.preprocess == Preprocess(
        image_size=12, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)
    )


def test_directory_without_config_is_clear(tmp_path: Path) -> None:
    with pytest.raises(MemauditError, match=r"without config\.json"):
        load_model(tmp_path)


# --- state-dict files with arch= -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_infers_classes_and_channels(tmp_path: Path, suffix: str) -> None:
    trained = load_model("timm:test_resnet", num_classes=7, in_chans=1)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in trained.net.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)

    model = load_model(path, arch="timm:test_resnet")
    assert (model.info.num_classes, model.info.in_chans) == (7, 1)
    _same_outputs(model, trained, torch.randn(2, 1, 32, 32))


def test_state_dict_nested_under_key(tmp_path: Path) -> None:
    trained = load_model("memaudit:resnet9", num_classes=3, in_chans=1)
    torch.save({"state_dict": trained.net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    model = load_model(tmp_path / "ckpt.pt", arch="memaudit:resnet9")
    _same_outputs(model, trained, torch.randn(2, 1, 16, 16))


def test_state_dict_of_classifier_or_data_parallel_loads(tmp_path: Path) -> None:
    trained = load_model("memaudit:resnet9", num_classes=3, in_chans=1)
    torch.save(trained.state_dict(), tmp_path / "wrapped.pt")  # keys start with "net."
    state = {f"module.{k}": v for k, v in trained.net.state_dict().items()}
    torch.save(state, tmp_path / "ddp.pt")
    x = torch.randn(2, 1, 16, 16)
    for name in ("wrapped.pt", "ddp.pt"):
        _same_outputs(load_model(tmp_path / name, arch="memaudit:resnet9"), trained, x)


def test_hf_head_in_sequential_gives_class_count(tmp_path: Path) -> None:
    # HF ResNet's head is Sequential(Flatten, Linear): the count comes from classifier.1.weight.
    trained = load_model(save_hf("resnet", tmp_path / "six", num_labels=6, num_channels=1))
    probe = load_model(save_hf("resnet", tmp_path / "two", num_labels=2))
    assert _shapes_from_state(probe, trained.net.state_dict()) == (6, 1)


def test_hf_state_dict_of_other_config_is_clear(tmp_path: Path) -> None:
    # A bare HF state dict rebuilds the family's default config; a tiny one cannot match it.
    trained = load_model(save_hf("vit", tmp_path / "hf"))
    torch.save(trained.net.state_dict(), tmp_path / "hf.pt")
    with pytest.raises(MemauditError, match="does not match architecture hf:vit: size mismatch"):
        load_model(tmp_path / "hf.pt", arch="hf:vit")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("num_classes", 3, "num_classes=7 but num_classes=3"), ("in_chans", 3, "in_chans=1")],
)
def test_state_dict_shape_mismatch_is_clear(
    tmp_path: Path, option: str, value: int, message: str
) -> None:
    trained = load_model("timm:test_resnet", num_classes=7, in_chans=1)
    torch.save(trained.net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(MemauditError, match=message):
        load_model(tmp_path / "w.pt", arch="timm:test_resnet", **{option: value})


def test_state_dict_needs_arch(tmp_path: Path) -> None:
    torch.save(tiny_cnn().state_dict(), tmp_path / "w.pt")
    with pytest.raises(MemauditError, match="--arch"):
        load_model(tmp_path / "w.pt")


def test_state_dict_of_other_architecture_is_clear(tmp_path: Path) -> None:
    torch.save(load_model("timm:test_vit", num_classes=3).net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(MemauditError, match="does not match architecture timm:test_resnet"):
        load_model(tmp_path / "w.pt", arch="timm:test_resnet")


# --- memaudit checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("arch", ["memaudit:resnet9", "timm:test_vit", "hf"])
def test_checkpoint_round_trip(
    tmp_path: Path, suffix: str, arch: str, hf_dirs: dict[str, Path]
) -> None:
    if arch == "hf":
        model = load_model(hf_dirs["convnext"])
    else:
        model = build_model(arch, num_classes=4, in_chans=1, config={})
    model.info.class_names = ["a", "b", "c", "d"]
    model.info.preprocess = Preprocess(image_size=16, mean=(0.1,), std=(0.3,))
    data = DataRef(source="/data/x.npz", split="train", label_column="y")
    path = save_model(model, tmp_path / f"model{suffix}", train_data=data)

    loaded = load_model(path)
    assert loaded.info.model_copy(update={"source": ""}) == model.info.model_copy(
        update={"source": "", "train_data": data}
    )
    assert loaded.info.source == str(path)
    x = torch.randn(3, model.info.in_chans or 3, 16, 16)
    _same_outputs(loaded, model, x)


def test_pt_checkpoint_loads_without_pickle(tmp_path: Path) -> None:
    model = build_model("memaudit:resnet9", num_classes=2, in_chans=1)
    path = save_model(model, tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["format"].startswith("memaudit-checkpoint")


def test_save_refuses_plain_module(tmp_path: Path) -> None:
    with pytest.raises(MemauditError, match="--arch"):
        save_model(load_model(tiny_cnn()), tmp_path / "m.safetensors")


# --- pickles, modules and corrupt files ---------------------------------------------------------


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    net = tiny_cnn()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(MemauditError, match="trust-pickle") as info:
        load_model(tmp_path / "whole.pt")
    assert "arbitrary code" in str(info.value) and "\n" not in str(info.value)

    model = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert model.info.num_classes == 3 and model.info.head == "8"
    _same_outputs(model, net, torch.randn(2, 1, 8, 8))


def test_pickled_classifier_is_not_wrapped_twice(tmp_path: Path) -> None:
    torch.save(load_model("memaudit:resnet9", num_classes=2, in_chans=1), tmp_path / "c.pt")
    model = load_model(tmp_path / "c.pt", trust_pickle=True)
    assert not isinstance(model.net, Classifier) and model.info.arch == "memaudit:resnet9"


def test_in_memory_module() -> None:
    net = tiny_cnn()
    model = load_model(net)
    assert model.net is net and model.info.num_classes == 3 and model.info.head == "8"
    assert load_model(model) is model


def test_hf_module_in_memory_returns_logits(hf_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForImageClassification

    net = AutoModelForImageClassification.from_pretrained(hf_dirs["vit"])
    assert load_model(net)(torch.randn(2, 3, 16, 16)).shape == (2, 4)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("random.pt", os.urandom(256), "not a readable PyTorch checkpoint"),
        ("text.pth", b"hello world\n", "not a readable PyTorch checkpoint"),
        ("empty.pt", b"", "not a readable PyTorch checkpoint"),
        ("random.safetensors", os.urandom(256), "not a readable safetensors file"),
        ("model.onnx", b"x", "not a model file memaudit reads"),
    ],
)
def test_corrupt_file_is_clear(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(MemauditError, match=message) as info:
        load_model(tmp_path / name)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint_is_clear(tmp_path: Path) -> None:
    path = save_model(build_model("memaudit:resnet9", num_classes=2), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MemauditError, match="not a readable PyTorch checkpoint"):
        load_model(path)


def test_missing_path_is_clear(tmp_path: Path) -> None:
    with pytest.raises(MemauditError, match="not found"):
        load_model(tmp_path / "nope.pt")


# --- hub ids (offline: a mocked cache miss) -------------------------------------------------------


def _offline_miss(*args: object, **kwargs: object) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("cannot find the requested files in the local cache")


def _check_hub_error(err: pytest.ExceptionInfo[MemauditError], source: str) -> None:
    from huggingface_hub import constants

    text = str(err.value)
    assert "\n" not in text and source in text
    assert constants.HF_HUB_CACHE in text and "HF_HUB_OFFLINE" in text


def test_hf_hub_id_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    monkeypatch.setattr(
        transformers.AutoModelForImageClassification, "from_pretrained", _offline_miss
    )
    with pytest.raises(MemauditError) as err:
        load_model("hf:google/vit-base-patch16-224")
    _check_hub_error(err, "hf:google/vit-base-patch16-224")


def test_timm_pretrained_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder

    monkeypatch.setattr(timm.models._builder, "load_pretrained", _offline_miss)
    with pytest.raises(MemauditError) as err:
        load_model("timm:test_resnet", pretrained=True, num_classes=10)
    _check_hub_error(err, "timm:test_resnet")
