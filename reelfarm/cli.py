"""`reelfarm ...`: thin commands over the same functions the flows call.

Exit codes: 0 done, 1 the run finished with failed shots, 2 bad input (nothing started).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reelfarm.errors import FarmError, SpecError

# Offline farms: Prefect's ephemeral server must not try to send telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    name="reelfarm",
    help="Render AI films on a Ray cluster: validate, plan, keyframes, render, resume.",
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
        err_console.print("[bold red]error:[/] " + escape(str(e)), highlight=False)
    return typer.Exit(code)


def _load(spec: str, allow_read: list[str] | None = None):
    """Load a spec; reads are confined to its folder, `allowed_read_roots` and ``--allow-read``."""
    from reelfarm.schemas.loader import load_spec
    from reelfarm.settings import Settings

    try:
        return load_spec(spec, allowed_roots=[*Settings().allowed_read_roots, *(allow_read or [])])
    except SpecError as e:
        raise _fail(e) from None


AllowReadOpt = Annotated[Optional[list[str]], typer.Option(
    "--allow-read", help="a folder or URL prefix the spec may read references and audio from, besides its "
    "own folder (repeat; adds to REELFARM_ALLOWED_READ_ROOTS)")]


@app.command()
def validate(spec: Annotated[str, typer.Argument(help="film or campaign spec: path or fsspec URL")],
             allow_read: AllowReadOpt = None) -> None:
    """Check a film or campaign spec. Prints every problem with file, line and field."""
    from reelfarm.schemas.film import Film

    loaded = _load(spec, allow_read)
    if isinstance(loaded, Film):
        n = sum(len(s.shots) for s in loaded.scenes)
        console.print(f"[green]ok[/] {loaded.title!r}: {len(loaded.scenes)} scenes, {n} shots", highlight=False)
    else:
        console.print(f"[green]ok[/] campaign {loaded.campaign.campaign!r}: {len(loaded.cells)} cells",
                      highlight=False)


def _shot_table(plan, price: float) -> Table:
    t = Table(title=f"{plan.title} — {plan.width}x{plan.height} @ {plan.fps} fps", title_justify="left")
    from reelfarm.render.memory import shot_peaks

    peaks = shot_peaks(plan)  # the memory model's estimate (render/memory.py)
    for col in ("scene", "shot", "frames", "chunks", "backend", "est GPU-s", "peak GiB"):
        t.add_column(col, justify="right" if col in ("frames", "chunks", "est GPU-s", "peak GiB") else "left")
    for s in plan.shots:
        peak = peaks.get(s.shot_id)
        t.add_row(s.scene_id, s.shot_id, str(s.frames), str(len(s.chunks)),
                  getattr(s.model, "family", s.model.backend), f"{s.est_gpu_s:,.1f}",
                  "-" if peak is None else f"{peak:,.1f}")
    return t


def _plan_totals(plan, price: float) -> list[str]:
    """The plan's totals as short lines: printed whole, never wrapped inside a figure."""
    hours = plan.est_gpu_s / 3600
    return [f"{len({s.scene_id for s in plan.shots})} scenes, {len(plan.shots)} shots, {len(plan.chunks)} chunks, "
            f"{plan.frames} frames ({plan.duration_s:.1f} s); "
            f"est {hours:,.3f} GPU-hours ≈ ${hours * price:,.2f} at ${price}/GPU-hour"]


def _print_lines(lines: list[str]) -> None:
    """Plain lines, wrapped at word boundaries only (a figure or id is never split)."""
    for line in lines:
        console.print(line, highlight=False, markup=False)


@app.command("plan")
def plan_cmd(
    spec: Annotated[str, typer.Argument(help="film or campaign spec")],
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    gpu_hour_price: Annotated[float, typer.Option("--gpu-hour-price", help="USD per GPU-hour")] = 2.5,
    gpus: Annotated[Optional[int], typer.Option(
        "--gpus", min=1, help="simulate the render on N GPUs: makespan, utilisation, cost")] = None,
    gpu: Annotated[str, typer.Option("--gpu", help="GPU class to simulate: l4, a10g, l40s, a100, h100, h200")
                   ] = "h200",
    allow_read: AllowReadOpt = None,
    gpu_memory: Annotated[Optional[list[float]], typer.Option(
        "--gpu-memory", help="GPU memory classes asked for, GiB (repeat; default 24, 48, 80, 141): "
                             "a film with a chunk that fits none is refused")] = None,
) -> None:
    """Plan a film or campaign into chunks and print the plan, its GPU-hours and cost.

    With ``--gpus N`` the render is simulated (the real scheduler on a simulated clock;
    GPU times from reelfarm.cluster.simulate's table, not the plan's estimates).
    """
    from reelfarm.flows.plan import plan_campaign, plan_film
    from reelfarm.schemas.film import Film

    def simulated(plans: list) -> None:
        from reelfarm.cluster.simulate import simulate_plans, summary

        result = simulate_plans(plans, gpus=int(gpus or 1), gpu=gpu)
        if as_json:
            sys.stdout.write(json.dumps(summary(result), indent=1) + "\n")
            return
        t = Table(title=f"simulated on {gpus} x {gpu}", title_justify="left")
        t.add_column("what")
        t.add_column("value", justify="right")
        for k, v in summary(result).items():
            t.add_row(k.replace("_", " "), f"{v:,.3f}" if isinstance(v, float) else str(v))
        t.caption = "GPU times, throughputs and prices are the table's (estimates where marked)"
        console.print(t)

    loaded = _load(spec, allow_read)
    if gpus is not None:
        from reelfarm.cluster.simulate import GPU_CLASSES

        if gpu not in GPU_CLASSES:
            raise typer.BadParameter(f"`--gpu` must be one of {', '.join(GPU_CLASSES)}, got {gpu!r}")
    try:
        if isinstance(loaded, Film):
            from reelfarm.render.memory import GPU_CLASSES as MEMORY_CLASSES
            from reelfarm.render.memory import check_plan_fits

            plan = plan_film(loaded)
            check_plan_fits(plan, tuple(gpu_memory or MEMORY_CLASSES))
            if gpus is not None:
                simulated([plan])
                return
            if as_json:
                sys.stdout.write(plan.model_dump_json(indent=1) + "\n")
            else:
                console.print(_shot_table(plan, gpu_hour_price))
                _print_lines(_plan_totals(plan, gpu_hour_price))
            return
        cplan = plan_campaign(loaded.campaign.campaign, loaded.cells)
    except FarmError as e:
        raise _fail(e) from None
    if gpus is not None:
        simulated([p for _, p in cplan.cells])
        return
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
    console.print(t)
    _print_lines([f"{len(cplan.cells)} cells, {cplan.chunk_count} chunks, {cplan.unique_chunks} unique "
                  "(shared chunks render once)",
                  f"est {hours:,.3f} GPU-hours ≈ ${hours * gpu_hour_price:,.2f} at ${gpu_hour_price}/GPU-hour"])


def _settings(address: str | None, workers: int | None, chunk_delay: float | None,
              storage_options: list[str] | None, dashboard_host: str | None):
    from reelfarm.settings import Settings

    overrides: dict = {}
    if address:
        overrides["address"] = address
    if workers:
        overrides["workers"] = workers
    if chunk_delay is not None:
        overrides["chunk_delay_s"] = chunk_delay
    if dashboard_host:
        overrides["dashboard_host"] = dashboard_host
        overrides["include_dashboard"] = True
    if storage_options:
        import yaml

        opts = {}
        for item in storage_options:
            k, sep, v = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"--storage-option takes KEY=VALUE, got {item!r}")
            value = yaml.safe_load(v) if v else v  # anon=false -> False, port=9000 -> 9000
            opts[k] = value if isinstance(value, (bool, int, float)) else v
        overrides["storage_options"] = _nest(opts)
    return Settings(**overrides)


def _nest(flat: dict[str, str]) -> dict:
    """``client_kwargs.endpoint_url=...`` -> ``{"client_kwargs": {"endpoint_url": ...}}``."""
    out: dict = {}
    for k, v in flat.items():
        node = out
        *head, last = k.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = v
    return out


AddressOpt = Annotated[
    Optional[str], typer.Option("--address", help="join a Ray cluster: auto, HOST:PORT or ray://...")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="CPU workers when there is no GPU", show_default="one per two cores, at least 1")]
DelayOpt = Annotated[
    Optional[float], typer.Option("--chunk-delay", help="seconds each chunk takes at least (demos, drills)")]
StorageOpt = Annotated[
    Optional[list[str]], typer.Option("--storage-option", help="fsspec option for OUT, KEY=VALUE (repeat)")]
DashOpt = Annotated[
    Optional[str], typer.Option("--dashboard-host", help="start an embedded Ray's dashboard on this host")]
PrefectOpt = Annotated[bool, typer.Option("--prefect/--no-prefect", help="record the run as a Prefect flow")]
JsonOpt = Annotated[bool, typer.Option("--json", help="progress as JSON lines on stdout, one per event")]


def _print_run(summary: dict) -> None:
    _print_lines([f"run {summary.get('run_id', '')}", f"out {summary.get('out', '')}"])
    t = Table()
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("chunks", "rendered", "cached", "failed", "model_loads", "identity_encodes", "nodes_used"):
        if k in summary:
            t.add_row(k.replace("_", " "), str(summary[k]))
    for k, v in (summary.get("keyframes") or {}).items():
        t.add_row(f"keyframes {k.replace('_', ' ')}", str(v))
    console.print(t)
    for shot, err in (summary.get("failed_shots") or {}).items():
        err_console.print(f"[red]shot {escape(shot)} failed:[/] {escape(str(err))}", highlight=False)
    if summary.get("error"):
        err_console.print(f"[bold red]error:[/] {escape(str(summary['error']))}; every chunk is kept: "
                          f"reelfarm resume {escape(str(summary.get('out', '')))} finishes the run",
                          highlight=False, soft_wrap=True)
    for name, url in (summary.get("outputs") or {}).items():
        console.print(f"  {name}: {url}", highlight=False, markup=False)


def _run(job, settings, use_prefect: bool, *, spec: str | None = None, as_json: bool = False) -> int:
    """Run a job (render ``spec``, or resume OUT when ``spec`` is None); returns the exit code.

    With Prefect the run is recorded as a flow; without, the same run function is called.
    Progress shows as it goes (see :mod:`reelfarm.progress`); Ctrl-C keeps every committed
    chunk, marks nothing running, and says how to resume (exit 130).
    """
    from reelfarm import events
    from reelfarm.cluster.outdir import OutputFolder
    from reelfarm.flows.render import up_to_date
    from reelfarm.progress import display_for

    out = err_console if as_json else console
    try:  # a bad OUT: exit 2, one line, before Prefect or Ray start
        OutputFolder(job.out_url, storage_options=settings.storage_options).check()
    except (FarmError, ValueError) as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    try:
        if up_to_date(job, settings):  # no Prefect, no Ray: nothing to render or encode
            cells = [cell or job.out_url for cell, _ in job.cells]
            if as_json:
                sys.stdout.write(json.dumps({"kind": "up_to_date", "out": job.out_url}) + "\n")
            else:
                out.print(f"[green]up to date[/]: every chunk and deliverable of {', '.join(cells)} "
                          "is current; nothing rendered or encoded", highlight=False)
            return 0
        display = display_for(console, as_json=as_json)
        with display, events.subscribed(display):
            summary = _run_recorded(job, settings, use_prefect, spec)
    except KeyboardInterrupt:
        return _interrupted(job, settings)
    except SpecError as e:
        raise _fail(e) from None
    except FarmError as e:
        raise _fail(e, code=1) from None
    cells = summary["cells"] if "cells" in summary else {"": summary}
    for cell, cell_summary in cells.items():
        if as_json:
            sys.stdout.write(json.dumps({"kind": "summary", "cell": cell, **cell_summary}) + "\n")
            continue
        if cell:
            console.print(f"[bold]cell {cell}[/]", highlight=False)
        _print_run(cell_summary)
    return max(0 if c["ok"] else 1 for c in cells.values())


def _run_recorded(job, settings, use_prefect: bool, spec: str | None) -> dict:
    from reelfarm.flows.render import run_job, run_summary

    if use_prefect:
        from reelfarm.flows.film import record_run, render_campaign_flow, render_film_flow, resume_flow

        flow_fn = render_campaign_flow if job.is_campaign else render_film_flow
        return (record_run(flow_fn, spec, job.out_url, settings) if spec
                else record_run(resume_flow, job.out_url, settings))
    results = run_job(job, settings)
    cells = {cell: run_summary(r) for cell, r in results.items()}
    return {"cells": cells} if job.is_campaign else cells[""]


def _interrupted(job, settings) -> int:
    """Ctrl-C: say what was kept and the exact command that finishes the run."""
    import shlex

    from reelfarm.cluster.store import ChunkStore
    from reelfarm.flows.plan import plan_film

    store = ChunkStore(job.out_url, storage_options=settings.storage_options)
    keys = {c.key for _, film in job.cells for c in plan_film(film).chunks}
    kept = sum(store.is_complete(k) for k in keys)
    err_console.print(f"[bold yellow]interrupted[/]: {kept} of {len(keys)} chunks are committed in "
                      f"{escape(job.out_url)} and kept. Finish the run with:", highlight=False, soft_wrap=True)
    # One line whatever the terminal's width: it is meant to be copied.
    err_console.print(f"  reelfarm resume {shlex.quote(job.out_url)}", highlight=False, markup=False,
                      soft_wrap=True)
    return 130


@app.command()
def render(
    spec: Annotated[str, typer.Argument(help="film or campaign spec: path or fsspec URL")],
    out: Annotated[str, typer.Option("--out", "-o", help="output location: folder or fsspec URL")],
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    chunk_delay: DelayOpt = None,
    storage_option: StorageOpt = None,
    dashboard_host: DashOpt = None,
    prefect: PrefectOpt = True,
    as_json: JsonOpt = False,
    allow_read: AllowReadOpt = None,
) -> None:
    """Render a film or campaign on Ray (an embedded local instance unless --address)."""
    from reelfarm.flows.render import RunJob

    settings = _settings(address, workers, chunk_delay, storage_option, dashboard_host)
    if allow_read:
        settings = settings.model_copy(update={"allowed_read_roots": [*settings.allowed_read_roots, *allow_read]})
    job = RunJob.from_loaded(_load(spec, allow_read), out, spec)  # bad input: exit 2 before Prefect or Ray
    raise typer.Exit(_run(job, settings, prefect, spec=spec, as_json=as_json))


@app.command()
def keyframes(
    spec: Annotated[str, typer.Argument(help="film or campaign spec: path or fsspec URL")],
    out: Annotated[str, typer.Option("--out", "-o", help="output location: folder or fsspec URL")],
    storage_option: StorageOpt = None,
    allow_read: AllowReadOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="the summary as one JSON line on stdout")] = False,
) -> None:
    """Render only the shots' keyframes and a contact sheet of them (OUT/keyframes.png).

    Approve them before the night's render: `reelfarm render SPEC --out OUT` into the same
    OUT reuses every keyframe made here (content keys) and renders none of them again.
    """
    from reelfarm.flows.keyframes import keyframes_only
    from reelfarm.flows.plan import plan_film
    from reelfarm.flows.render import RunJob

    settings = _settings(None, None, None, storage_option, None)
    job = RunJob.from_loaded(_load(spec, allow_read), out, spec)  # bad input: exit 2, nothing made
    try:
        summary, sheets = keyframes_only([(cell, plan_film(film)) for cell, film in job.cells], out,
                                         settings.storage_options)
    except FarmError as e:
        raise _fail(e, code=1) from None
    if as_json:
        sys.stdout.write(json.dumps({"kind": "keyframes", **summary.to_doc(), "sheets": sheets}) + "\n")
        return
    t = Table()
    t.add_column("keyframes")
    t.add_column("count", justify="right")
    for k, v in summary.to_doc().items():
        t.add_row(k.replace("_", " "), str(v))
    console.print(t)
    for cell, url in sheets.items():
        console.print(f"  {cell + ': ' if cell else ''}{url}", highlight=False, markup=False)


@app.command()
def resume(
    out: Annotated[str, typer.Argument(help="the output location of an earlier run")],
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    chunk_delay: DelayOpt = None,
    storage_option: StorageOpt = None,
    prefect: PrefectOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Finish an interrupted film or campaign run: renders only the chunks storage lacks."""
    from reelfarm.flows.render import resume_job

    settings = _settings(address, workers, chunk_delay, storage_option, None)
    try:
        job = resume_job(out, settings.storage_options)  # no run there: exit 2, nothing started
    except FarmError as e:
        raise _fail(e) from None
    raise typer.Exit(_run(job, settings, prefect, as_json=as_json))


@app.command()
def status(
    out: Annotated[str, typer.Argument(help="output location of a run")],
    storage_option: StorageOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until no chunk is running")] = False,
    interval: Annotated[float, typer.Option("--interval", help="seconds between refreshes with --watch")] = 2.0,
) -> None:
    """Show a run's chunks by status and shot, from its manifest (live with --watch)."""
    import time

    from rich.live import Live

    from reelfarm.cluster.store import ChunkStore

    settings = _settings(None, None, None, storage_option, None)
    store = ChunkStore(out, storage_options=settings.storage_options)
    rows = _manifest_rows(store)
    if rows is None:
        err_console.print(f"no manifest in {out}", highlight=False)
        raise typer.Exit(2)
    if not watch:
        console.print(_status_table(rows))
    else:
        with Live(_status_table(rows), console=console, refresh_per_second=1) as live:
            while any(r["status"] in ("running", "planned") for r in rows):
                time.sleep(interval)
                rows = _manifest_rows(store) or rows
                live.update(_status_table(rows))
    for r in rows:
        if r["status"] == "failed":
            err_console.print(f"  {r['chunk_name']}: {r['error']}", highlight=False, markup=False)


def _manifest_rows(store) -> list[dict] | None:
    from reelfarm.cluster.manifest import read_manifest

    table = read_manifest(store)
    return None if table is None else table.to_pylist()


def _status_table(rows: list[dict]) -> Table:
    """Per shot: chunks by status, frames done; a total row."""
    statuses = ("done", "cached", "running", "planned", "failed")
    t = Table(title=f"run {rows[0]['run_id'] if rows else '?'}: {len(rows)} chunks", title_justify="left")
    for col in ("shot", *statuses, "frames"):
        t.add_column(col, justify="left" if col == "shot" else "right")
    shots: dict[str, dict[str, int]] = {}
    for r in rows:
        c = shots.setdefault(r["shot_id"], {k: 0 for k in (*statuses, "frames", "frames_done")})
        c[r["status"]] = c.get(r["status"], 0) + 1
        n = r["frame_end"] - r["frame_start"]
        c["frames"] += n
        c["frames_done"] += n if r["status"] in ("done", "cached") else 0
    total = {k: sum(c.get(k, 0) for c in shots.values()) for k in (*statuses, "frames", "frames_done")}
    for shot, c in [*shots.items(), ("total", total)]:
        t.add_row(shot, *(str(c.get(k, 0)) for k in statuses), f"{c['frames_done']}/{c['frames']}")
    return t


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="output folder")] = "demo-out",
    spec: Annotated[Optional[str], typer.Option("--spec", help="film to render")] = None,
    workers: WorkersOpt = None,
) -> None:
    """Render the bundled example on embedded defaults: local Ray, ephemeral Prefect, animatic."""
    spec = spec or str(EXAMPLE)
    console.print(f"[bold]reelfarm demo[/]: {spec} -> {out}", highlight=False)
    plan_cmd(spec, as_json=False, gpu_hour_price=2.5)
    settings = _settings(None, workers, None, None, None)
    from reelfarm.flows.render import RunJob

    raise typer.Exit(_run(RunJob.from_loaded(_load(spec), out, spec), settings, True, spec=spec))


@app.command()
def schedule(
    spec: Annotated[str, typer.Argument(help="campaign spec with a `schedule: {cron: ...}`")],
    out: Annotated[str, typer.Option("--out", "-o", help="output location for every run")],
    name: Annotated[Optional[str], typer.Option("--name", help="deployment name")] = None,
    allow_read: AllowReadOpt = None,
) -> None:
    """Serve a campaign as a Prefect deployment on its cron schedule (blocks)."""
    from prefect import serve

    from reelfarm.flows.deploy import build_deployment
    from reelfarm.settings import Settings

    try:
        deployment = build_deployment(spec, out, name=name,
                                      allowed_roots=[*Settings().allowed_read_roots, *(allow_read or [])])
    except SpecError as e:
        raise _fail(e) from None
    console.print(f"serving deployment {deployment.name!r} ({deployment.schedules})", highlight=False)
    serve(deployment)


def main() -> None:  # pragma: no cover - console script
    logging.basicConfig(level=logging.WARNING)
    if len(sys.argv) > 1 and sys.argv[1] in ("render", "resume", "demo"):
        # Whatever this process starts (Prefect's server, an embedded Ray) must not outlive
        # it, however it dies: a watchdog in its own session stops the leftovers.
        from reelfarm.reaper import start_reaper

        start_reaper()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
