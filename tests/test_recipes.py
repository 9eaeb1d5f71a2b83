"""Recipes: validation with clear errors, the shipped recipes, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memaudit import MemauditError
from memaudit.cli import main
from memaudit.recipes import Recipe, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert "What the paper found" in path.read_text()
    assert "What our run shows" in path.read_text()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: x\ntestbed:\n  epochz: 3\n", "testbed.epochz: unknown key"),
        ("name: x\nbogus: 1\n", "bogus: unknown key"),
        ("name: x\ntestbed:\n  epochs: three\n", "testbed.epochs"),
        ("name: x\naudit:\n  noisy: -1\n", "audit.noisy"),
        ("testbed: {}\n", "name"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_give_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(MemauditError) as err:
        load_recipe(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_tiny_recipe_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every stage on a 1-epoch, width-2 testbed: JSON reports and one HTML page."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "name: tiny\n"
        "testbed: {epochs: 1, arch_config: {width: 2}, noise: 0.1}\n"
        "probes: {epochs: [0, 1], retrain_epochs: 1}\n"
        "audit:\n"
        "  noisy: 3\n"
        "  clean: 3\n"
        "  scan: {max_units: 8, reference_size: 16, eval_size: 16}\n"
        "  unlearn: finetune\n"
        "example_tied_dropout: true\n"
    )
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    for name in ("gradients", "rewind", "retrain", "audit"):
        assert json.loads((out / f"{name}.json").read_text())["kind"] == name
    etd = json.loads((out / "testbed-etd" / "testbed.json").read_text())
    assert set(etd["dropout_modes"]) == {"expectation", "drop", "drop-recalibrated"}
    page = (out / "report.html").read_text()
    assert "memaudit recipe: tiny" in page
    assert isinstance(Recipe.model_json_schema(), dict)
