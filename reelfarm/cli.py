"""`reelfarm ...`: thin commands over the same functions the flows call.

Exit codes: 0 done, 1 the run finished with failed shots, 2 bad input (nothing started).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from reelfarm.errors import FarmError, SpecError

app = typer.Typer(
    name="reelfarm",
    help="Render AI films on a Ray cluster: validate, plan, render, resume.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny" / "film.yaml"


def _fail(e: FarmError, code: int = 2) -> typer.Exit:
    if isinstance(e, SpecError):
        err_console.print(f"[bold red]invalid spec[/] ({len(e.issues)} problem(s)):", highlight=False)
        for issue in e.issues:
            err_console.print(f"  {issue}", highlight=False, markup=False, soft_wrap=True)
    else:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
    return typer.Exit(code)


def _load(spec: str):
    from reelfarm.schemas.loader import load_spec

    try:
        return load_spec(spec)
    except SpecError as e:
        raise _fail(e) from None


@app.command()
def validate(spec: Annotated[str, typer.Argument(help="film or campaign spec: path or fsspec URL")]) -> None:
    """Check a film or campaign spec. Prints every problem with file, line and field."""
    from reelfarm.schemas.film import Film

    loaded = _load(spec)
    if isinstance(loaded, Film):
        n = sum(len(s.shots) for s in loaded.scenes)
        console.print(f"[green]ok[/] {loaded.title!r}: {len(loaded.scenes)} scenes, {n} shots", highlight=False)
    else:
        console.print(f"[green]ok[/] campaign {loaded.campaign.campaign!r}: {len(loaded.cells)} cells",
                      highlight=False)


def _shot_table(plan, price: float) -> Table:
    t = Table(title=f"{plan.title} — {plan.width}x{plan.height} @ {plan.fps} fps", title_justify="left")
    for col in ("scene", "shot", "frames", "chunks", "backend", "est GPU-s"):
        t.add_column(col, justify="right" if col in ("frames", "chunks", "est GPU-s") else "left")
    for s in plan.shots:
        t.add_row(s.scene_id, s.shot_id, str(s.frames), str(len(s.chunks)),
                  getattr(s.model, "family", s.model.backend), f"{s.est_gpu_s:,.1f}")
    hours = plan.est_gpu_s / 3600
    t.caption = (f"{len({s.scene_id for s in plan.shots})} scenes, {len(plan.shots)} shots, "
                 f"{len(plan.chunks)} chunks, {plan.frames} frames ({plan.duration_s:.1f} s); "
                 f"est {hours:,.3f} GPU-hours ≈ ${hours * price:,.2f} at ${price}/GPU-hour")
    return t


@app.command("plan")
def plan_cmd(
    spec: Annotated[str, typer.Argument(help="film or campaign spec")],
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    gpu_hour_price: Annotated[float, typer.Option("--gpu-hour-price", help="USD per GPU-hour")] = 2.5,
) -> None:
    """Plan a film or campaign into chunks and print the plan, its GPU-hours and cost."""
    from reelfarm.flows.plan import plan_campaign, plan_film
    from reelfarm.schemas.film import Film

    loaded = _load(spec)
    try:
        if isinstance(loaded, Film):
            plan = plan_film(loaded)
            if as_json:
                sys.stdout.write(plan.model_dump_json(indent=1) + "\n")
            else:
                console.print(_shot_table(plan, gpu_hour_price))
            return
        cplan = plan_campaign(loaded.campaign.campaign, loaded.cells)
    except FarmError as e:
        raise _fail(e) from None
    if as_json:
        doc = {
            "campaign": cplan.title,
            "chunks": cplan.chunk_count,
            "unique_chunks": cplan.unique_chunks,
            "est_gpu_s": cplan.est_gpu_s,
            "cells": [{"cell": c.cell_id, "values": c.values, "plan": p.model_dump(mode="json")}
                      for c, p in cplan.cells],
        }
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        return
    t = Table(title=f"campaign {cplan.title}", title_justify="left")
    for col in ("cell", "size", "shots", "chunks", "frames", "est GPU-s"):
        t.add_column(col, justify="left" if col in ("cell", "size") else "right")
    for cell, p in cplan.cells:
        t.add_row(cell.cell_id, f"{p.width}x{p.height}", str(len(p.shots)), str(len(p.chunks)),
                  str(p.frames), f"{p.est_gpu_s:,.1f}")
    hours = cplan.est_gpu_s / 3600
    t.caption = (f"{len(cplan.cells)} cells, {cplan.chunk_count} chunks, {cplan.unique_chunks} unique "
                 f"(shared chunks render once); est {hours:,.3f} GPU-hours ≈ ${hours * gpu_hour_price:,.2f}")
    console.print(t)


def main() -> None:  # pragma: no cover - console script
    logging.basicConfig(level=logging.WARNING)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
