"""Build the "model memaudit did not make" scenario: a timm state dict and a ``datasets`` folder.

A timm ``resnet18`` (``in_chans=1``) trained at 32×32 on the bundled MNIST subset padded to
32×32, normalized with mean 0.5 / std 0.5, with 3.5% of its training labels corrupted (140 ids),
saved as a plain ``state_dict``; the data as a ``datasets`` ``save_to_disk`` folder of 32×32
PIL images (given, noisy labels); the corrupted ids as ``noisy_ids.txt``. This is how a user
brings their own model: nothing in it says how it was preprocessed.

    python benchmarks/user_model.py --out /tmp/user
    memaudit scan /tmp/user/resnet18_state.pt --arch timm:resnet18 --mean 0.5 --std 0.5 \
        --flagged /tmp/user/noisy_ids.txt --data /tmp/user/digits
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from memaudit.models import load_model
from memaudit.testbed import TestbedConfig, build_testbed, mnist_arrays


def save_digits(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``{split}_images`` ([N, H, W] uint8) and ``{split}_labels`` as a save_to_disk folder."""
    import datasets
    from PIL import Image

    names = [str(n) for n in arrays["class_names"]]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    splits = {
        split: datasets.Dataset.from_dict(
            {
                "image": [Image.fromarray(a) for a in arrays[f"{split}_images"]],
                "label": [int(v) for v in arrays[f"{split}_labels"]],
            },
            features=features,
        )
        for split in ("train", "test")
    }
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/user"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=0.035)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    arrays = mnist_arrays(test_fraction=0.2, seed=0)
    for split in ("train", "test"):  # 28x28 -> 32x32, as LeNet-style pipelines pad MNIST
        arrays[f"{split}_images"] = np.pad(arrays[f"{split}_images"], ((0, 0), (2, 2), (2, 2)))
    clean = save_digits(out / "digits_clean", arrays)
    config = TestbedConfig(
        data=str(clean), arch="timm:resnet18", noise=args.noise, epochs=args.epochs
    )
    result = build_testbed(out / "testbed", config, device=args.device)
    print(result.model_dump_json(indent=2))

    # What the user hands over: weights only, data with its given (noisy) labels, the ids.
    model = load_model(out / "testbed" / "model.safetensors")
    torch.save(model.net.state_dict(), out / "resnet18_state.pt")
    noisy = dict(np.load(out / "testbed" / "data.npz"))
    given = {
        "train_images": noisy["train_images"][:, 0],
        "train_labels": noisy["train_labels"],
        "test_images": noisy["test_images"][:, 0],
        "test_labels": noisy["test_labels"],
        "class_names": noisy["class_names"],
    }
    shutil.rmtree(out / "digits", ignore_errors=True)
    save_digits(out / "digits", given)
    shutil.copy(out / "testbed" / "noisy_ids.txt", out / "noisy_ids.txt")
    print(
        f"memaudit scan {out}/resnet18_state.pt --arch timm:resnet18 --mean 0.5 --std 0.5 "
        f"--flagged {out}/noisy_ids.txt --data {out}/digits"
    )


if __name__ == "__main__":
    main()
