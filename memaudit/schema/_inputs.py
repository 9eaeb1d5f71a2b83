"""What a model was shown and how it scored before any work: preprocessing and preflight."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(frozen=True, extra="forbid")


def _values(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


class Preprocessing(BaseModel):
    """The effective preprocessing: what the model sees, what the data holds, and why."""

    model_config = _STRICT
    image_size: tuple[int, int] = Field(description="height, width of the model's inputs")
    native_size: tuple[int, int] = Field(description="height, width of the images as stored")
    channels: int = Field(description="channels of the model's inputs")
    native_channels: int = Field(description="channels of the images as stored")
    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str = Field(description="why these values were chosen, in words")

    @property
    def resized(self) -> bool:
        return self.image_size != self.native_size

    def describe(self) -> str:
        """One line: size, channels, normalization and where each comes from."""
        h, w = self.image_size
        size = f"{h}×{w}"
        size += (
            f" (resized from {self.native_size[0]}×{self.native_size[1]})"
            if self.resized
            else " as stored"
        )
        chans = f"{self.channels} channel{'s' if self.channels > 1 else ''}"
        if self.channels != self.native_channels:
            chans += f" (converted from {self.native_channels})"
        norm = f"mean {_values(self.mean)} / std {_values(self.std)}"
        return f"{size}, {chans}, {norm} ({self.origin})"


class Preflight(BaseModel):
    """The model's accuracy on its own data, measured before a scan, unlearning or probe.

    A model near chance on its training rows is not the model this data trained, or it is shown
    the data in another way than in training (size, normalization, channels, label order).
    """

    model_config = _STRICT
    preprocessing: Preprocessing
    n_train: int = Field(description="non-flagged training rows measured")
    train_accuracy: float | None
    n_test: int = Field(0, description="test rows measured")
    test_accuracy: float | None = None
    chance: float | None = Field(description="share of the most common label among those rows")
    min_train_accuracy: float = Field(description="the refusal threshold that was applied")
    warnings: list[str] = Field(default_factory=list)
    seconds: float = Field(ge=0)

    def threshold(self) -> str:
        """The refusal rule that was applied, in words."""
        chance = "n/a" if self.chance is None else f"{self.chance:.1%}"
        return f"refused below {self.min_train_accuracy:.1%}; chance {chance}"

    def describe(self) -> str:
        """One line: the measured accuracies."""
        if self.train_accuracy is None:
            return "no non-flagged training rows to measure"
        text = f"{self.train_accuracy:.1%} of {self.n_train} non-flagged training rows"
        if self.test_accuracy is not None:
            text += f", {self.test_accuracy:.1%} of {self.n_test} test rows"
        return text + " predicted as labelled"
