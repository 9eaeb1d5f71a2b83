"""``memaudit run RECIPE``: a whole study from one YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from memaudit.cli._app import app, err, out
from memaudit.cli._common import DeviceOpt, writable
from memaudit.cli._testbed import StageBars, progress
from memaudit.recipes import load_recipe, run_recipe


@app.command("run")
def run_command(
    recipe: Annotated[
        Path, typer.Argument(help="Recipe file (YAML), e.g. recipes/mnist-label-noise.yaml.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory for every report and the page.")
    ] = Path("runs/recipe"),
    device: DeviceOpt = "auto",
) -> None:
    """Run a recipe: testbed, layer probes, audit, example-tied dropout; JSON + one HTML page."""
    spec = load_recipe(recipe)
    writable(out_dir, "--out", folder=True)
    err.print(f"[bold]recipe {spec.name}[/] -> {out_dir}")
    with progress() as bar:
        written = run_recipe(
            spec,
            out_dir,
            device=device,
            on_stage=lambda s: bar.console.print(f"stage: {s}"),
            on_progress=StageBars(bar),
        )
    table = Table(title=f"recipe {spec.name}: files written")
    table.add_column("what")
    table.add_column("file")
    for name, path in written.items():
        table.add_row(name, str(path))
    out.print(table)
