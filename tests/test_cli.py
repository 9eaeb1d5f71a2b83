"""The CLI: --version, --help everywhere, and bad input -> exit 2 with one line, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import tiny_cnn

from memaudit import __version__
from memaudit.cli import EXIT_OK, EXIT_USAGE, main
from memaudit.cli._app import app
from memaudit.models import build_model, load_model, save_model


def _commands(group: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, command in sorted(getattr(group, "commands", {}).items()):
        yield from _commands(command, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _fails_cleanly(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> str:
    """Run ``argv``: exit 2, one line on stderr naming ``message``, no traceback."""
    assert main(argv) == EXIT_USAGE
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert len(_lines(stderr)) == 1, stderr
    assert message in stderr, stderr
    return stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"memaudit {__version__}"


def test_core_commands_exist() -> None:
    assert {("testbed",), ("demo",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "memaudit")
def test_help_on_every_command(capsys: pytest.CaptureFixture[str], command: tuple[str]) -> None:
    assert main([*command, "--help"]) == EXIT_OK
    assert "Usage" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["testbed", "--no-such-option"]) == EXIT_USAGE
    assert "No such option" in capsys.readouterr().err
    assert main(["no-such-command"]) == EXIT_USAGE
    assert "Traceback" not in capsys.readouterr().err


# --- bad model inputs through `memaudit scan MODEL --flagged IDS` --------------------------------


@pytest.fixture
def ids_file(tmp_path: Path) -> Path:
    path = tmp_path / "ids.txt"
    path.write_text("0\n1\n")
    return path


def _scan(model: Path | str, ids: Path, *extra: str) -> list[str]:
    return ["scan", str(model), "--flagged", str(ids), "--device", "cpu", *extra]


def test_missing_model_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ids_file: Path
) -> None:
    _fails_cleanly(capsys, _scan(tmp_path / "missing.pt", ids_file), "not found")


def test_corrupt_checkpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ids_file: Path
) -> None:
    for name in ("model.pt", "model.safetensors"):
        (tmp_path / name).write_bytes(os.urandom(512))
        _fails_cleanly(capsys, _scan(tmp_path / name, ids_file), "not a readable")
    # bytes that open like a pickle of protocol 30: torch.load warns, then fails; one line still
    (tmp_path / "model.pt").write_bytes(b"\x80\x1e" + bytes(510))
    _fails_cleanly(capsys, _scan(tmp_path / "model.pt", ids_file), "not a readable")


def test_pickle_needs_trust_pickle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ids_file: Path
) -> None:
    torch.save(tiny_cnn(), tmp_path / "whole.pt")
    _fails_cleanly(capsys, _scan(tmp_path / "whole.pt", ids_file), "--trust-pickle")
    # Trusted, it loads; a plain module records no data, which is the next clear error.
    argv = _scan(tmp_path / "whole.pt", ids_file, "--trust-pickle")
    _fails_cleanly(capsys, argv, "does not record its training data; pass --data")


def test_bad_ids_file_and_out_of_range_ids(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = build_model("memaudit:resnet9", num_classes=3, in_chans=1, config={"width": 2})
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4) % 3)
    path = str(save_model(model, tmp_path / "m.safetensors"))
    ids = tmp_path / "ids.txt"
    ids.write_text("# only comments\n")
    _fails_cleanly(capsys, _scan(path, ids, "--data", str(tmp_path / "d.npz")), "no example ids")
    ids.write_text("1\nx1\n")
    _fails_cleanly(capsys, _scan(path, ids, "--data", str(tmp_path / "d.npz")), "not an integer")
    ids.write_text("2\n9\n")
    _fails_cleanly(capsys, _scan(path, ids, "--data", str(tmp_path / "d.npz")), "out of range")


def test_error_message_with_brackets_prints_verbatim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ids_file: Path
) -> None:
    # Rich markup must not eat (or choke on) "[...]" inside a path or message.
    folder = tmp_path / "[run]" / "[/x]"
    folder.mkdir(parents=True)
    stderr = _fails_cleanly(capsys, _scan(folder / "m.pt", ids_file), "not found")
    assert "[run]" in stderr and "[/x]" in stderr


# --- testbed and demo ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without CUDA")
def test_testbed_cuda_without_gpu_in_a_subprocess(tmp_path: Path) -> None:
    exe = shutil.which("memaudit", path=str(Path(sys.executable).parent))
    assert exe is not None, "the memaudit console script is not installed"
    run = subprocess.run(
        [exe, "testbed", "--device", "cuda", "--out", str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == EXIT_USAGE
    assert "Traceback" not in run.stderr
    assert _lines(run.stderr) == [
        "error: --device cuda was asked for but no CUDA GPU is available; use cpu"
    ]
    assert not (tmp_path / "tb").exists()


def test_testbed_command_on_a_tiny_dataset(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "src.npz",
        train_images=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
        train_labels=np.arange(30) % 3,
        test_images=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8),
        test_labels=np.arange(9) % 3,
    )
    out = tmp_path / "tb"
    argv = ["testbed", "--data", str(tmp_path / "src.npz"), "--epochs", "1", "--out", str(out)]
    _fails_cleanly(capsys, [*argv, "--arch-config", "width"], "--arch-config takes KEY=VALUE")
    _fails_cleanly(capsys, [*argv, "--noise", "2"], "invalid testbed setting noise")
    _fails_cleanly(capsys, [*argv, "--arch-config", "depth=3"], "cannot build memaudit:resnet9")
    assert main([*argv, "--arch-config", "width=4", "--device", "cpu"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "noisy train" in captured.out and "test" in captured.out
    assert "warning" not in captured.err, captured.err
    assert (out / "model.safetensors").is_file() and (out / "testbed.json").is_file()
    assert load_model(out / "model.safetensors").info.arch_config == {"width": 4}


def test_demo_reuses_a_built_testbed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_testbed: Path
) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "testbed").symlink_to(tiny_testbed, target_is_directory=True)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "Reusing the testbed" in captured.err
    assert "noisy train" in captured.out
    assert "memorized (noisy) vs clean" in captured.out  # the scan comparison
    assert "flagged accuracy (example-tied-dropout)" in captured.out  # the unlearning
    page = tmp_path / "demo" / "demo-report.html"
    assert page.exists() and f"report: {page.resolve()}" in captured.out.replace("\n", "")


def test_every_scan_setting_is_an_option_of_scan_and_audit() -> None:
    """Options are declared once, as fields: a new setting reaches every command that takes it."""
    from memaudit.cli._common import LoadOptions
    from memaudit.schema import ScanSettings, UnlearnSettings

    def flags(path: tuple[str, ...]) -> set[str]:
        command = typer.main.get_command(app)
        for name in path:
            command = command.commands[name]  # type: ignore[attr-defined]
        return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}

    scan_flags = {"--" + f.replace("_", "-") for f in ScanSettings.model_fields}
    load_flags = {"--" + f.replace("_", "-") for f in LoadOptions.model_fields}
    for path in (("scan",), ("audit",)):
        assert scan_flags | load_flags <= flags(path), path
    for path in (("unlearn",), ("probe", "gradients"), ("probe", "rewind"), ("probe", "retrain")):
        assert load_flags <= flags(path), path
    assert "--no-prune" in flags(("scan",))
    unlearn_flags = {"--" + f.replace("_", "-") for f in UnlearnSettings.model_fields}
    unlearn_flags -= {"--options"}  # method-specific: Python and recipes
    assert unlearn_flags <= flags(("unlearn",))
    assert unlearn_flags - {"--seed", "--batch-size"} <= flags(("audit",))  # the scan's there


def test_a_bad_generated_option_names_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scan", "m.pt", "--flagged", "ids.txt", "--max-units", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-units" in err and len(err.strip().splitlines()) == 1
    argv = ["unlearn", "m.pt", "--flagged", "ids.txt", "--out-model", "u.safetensors"]
    assert main([*argv, "--membership-references", "1"]) == 2
    err = capsys.readouterr().err
    assert "--membership-references" in err and "at least two" in err
    assert len(err.strip().splitlines()) == 1
