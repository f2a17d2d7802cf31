"""`dune-train`: train a student from a cache (`fit`), score it (`eval`), export it (`export`).

    dune-train fit CONFIG.toml [--cache PATH] [--out DIR] [--online] [--max-steps N]
                   [--trust-cache-code]
    dune-train eval RUN_DIR [--cache CACHE | --online] [--which last|best] [--trust-cache-code]
    dune-train export RUN_DIR OUT [--which best|last] [--format timm|dune] [--rename OURS=REF]
    dune-train preset NAME FOLDER [--overwrite]

Rerunning the same `fit` command resumes from the run folder's last checkpoint. Several
processes: `torchrun --nproc_per_node N -m train.cli fit CONFIG.toml`. Errors of this project
print as one line plus a hint; set DUNE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cache_format.configfile import with_overrides
from cache_format.errors import ConfigError, run_cli
from cache_format.locations import absolute_path
from train.config import load_train_config, resolve_paths
from train.metrics import first_last

if TYPE_CHECKING:  # the eval machinery is imported by the command, so that --help stays fast
    from train.run_eval import EvalResult

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stage two of DUNE distillation: train the student and projectors from a cache.",
)


#: `--online` rebuilds the teachers the cache's manifest describes; a `factory:` teacher there
#: names user code, which runs only when trusted (precompute/teachers/trust.py).
TrustCacheCode = Annotated[bool, typer.Option(
    "--trust-cache-code", help="With --online: let `factory:` teachers named inside the cache "
    "import and run their code (same as DUNE_TRUST_CACHE_CODE=1).")]


def trust_cache_code(trust: bool) -> None:
    """Turn the flag into the environment variable the trust check reads, so that it also
    reaches torchrun's other ranks and DataLoader workers started from this process."""
    if trust:
        from precompute.teachers.trust import TRUST_ENV

        os.environ[TRUST_ENV] = "1"


class ExportFormat(enum.StrEnum):
    """What `export` writes: timm safetensors + our full model, or naver/dune's `.pth`."""

    timm = "timm"
    dune = "dune"


class Which(enum.StrEnum):
    """Which checkpoint of a run to export or score."""

    best = "best"
    last = "last"


@app.command()
def fit(
    config: Annotated[Path, typer.Argument(help="The run's TOML config.")],
    cache: Annotated[
        str | None, typer.Option("--cache", help="Cache path (overrides data.cache).")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", help="Run folder (overrides out_dir).")
    ] = None,
    online: Annotated[
        bool, typer.Option("--online", help="Run the cache's teachers in the loop (baseline).")
    ] = False,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", help="Stop after N steps (the schedule is unchanged)."),
    ] = None,
    trust: TrustCacheCode = False,
) -> None:
    """Train (or resume training) the student and projectors described by CONFIG, stage by
    stage when it lists `[[stages]]`."""
    from train.stages import fit_run  # imported here so that `--help` stays fast

    trust_cache_code(trust)

    cfg = load_train_config(config)
    cfg = with_overrides(
        cfg,
        {
            "data.cache": absolute_path(cache) if cache else None,
            "out_dir": absolute_path(out) if out else None,
            "online": True if online else None,
            "max_steps": max_steps,
        },
    )
    cfg = resolve_paths(cfg, config)
    console = Console()
    summary = fit_run(cfg, progress="bar" if console.is_terminal else "lines")
    if summary["rank"] == 0:
        print_fit_summary(summary, console)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A `fit` run folder.")],
    out_dir: Annotated[
        Path, typer.Argument(help="Where to write (a folder; with --format dune also a .pth).")
    ],
    which: Annotated[Which, typer.Option(help="Checkpoint to export.")] = Which.best,
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="timm: student.safetensors + full model; dune: "
                     "naver/dune's checkpoint layout (load_dune_from_checkpoint)."),
    ] = ExportFormat.timm,
    rename: Annotated[
        list[str] | None,
        typer.Option("--rename", help="OURS=REF: a teacher's name in the DUNE checkpoint "
                     "(the reference looks teachers up by name). Repeatable."),
    ] = None,
) -> None:
    """Export a run: the student for timm and the full model, or the DUNE layout."""
    from train.export import export_dune, export_run

    console = Console()
    if fmt is ExportFormat.dune:
        paths = export_dune(run_dir, out_dir, which=which.value, rename=parse_renames(rename))
        for role, path in paths.items():
            console.print(f"{role:16s} {path}")
        console.print(
            "load it with naver/dune: model.dune.load_dune_from_checkpoint(path), or here: "
            "train.dune_format.model_from_dune(path)"
        )
        return
    paths = export_run(run_dir, out_dir, which=which.value)
    for role, path in paths.items():
        console.print(f"{role:16s} {path}")
    console.print(
        "load the student with: timm.create_model(cfg['architecture'], "
        "checkpoint_path='student.safetensors', **cfg['model_args']) where cfg = student.json"
    )


@app.command("eval")
def eval_command(
    run_dir: Annotated[Path, typer.Argument(help="A `fit` run folder.")],
    cache: Annotated[
        str | None,
        typer.Option("--cache", help="Score against this cache's targets (it must hold the "
                     "run's held-out views and teachers, in any encoding)."),
    ] = None,
    online: Annotated[
        bool, typer.Option("--online", help="Score against the run's teachers run online.")
    ] = False,
    which: Annotated[Which, typer.Option(help="Checkpoint to score.")] = Which.last,
    trust: TrustCacheCode = False,
) -> None:
    """Score a run's student on its held-out views against a cache's targets or the teachers
    run online (default: the run's own cache); writes RUN/eval/<name>.json."""
    from train.run_eval import eval_run

    trust_cache_code(trust)
    result = eval_run(run_dir, cache=cache, online=online, which=which.value)
    print_eval(result, Console())


def print_eval(result: EvalResult, console: Console) -> None:
    """The held-out loss and cosine per teacher of a `train.run_eval.EvalResult`."""
    metrics = result.metrics
    target = ("teachers online (views from " + result.cache + ")" if result.source == "online"
              else f"{result.cache} ({result.encoding['name']})")
    table = Table(title=f"dune-train eval: step {result.step} ({result.which}) vs {target}")
    for column in ("teacher", "held-out loss", "held-out cosine"):
        table.add_column(column)
    for teacher in result.teachers:
        if f"heldout/loss/{teacher}" in metrics:
            table.add_row(teacher, f"{metrics[f'heldout/loss/{teacher}']:.5f}",
                          f"{metrics[f'heldout/cos/{teacher}']:.5f}")
    table.add_row("mean", f"{metrics['heldout/loss']:.5f}", "")
    console.print(table)
    console.print(f"held-out samples  {int(metrics['heldout/samples'])} "
                  f"({result.heldout_images} images per dataset)")
    console.print(f"checkpoint        {result.checkpoint}")
    console.print(f"written           {result.path}")


def parse_renames(pairs: list[str] | None) -> dict[str, str]:
    """`["ours=ref", ...]` -> {"ours": "ref"}; a malformed pair is a ConfigError."""
    renames: dict[str, str] = {}
    for pair in pairs or []:
        ours, sep, ref = pair.partition("=")
        if not sep or not ours or not ref or ours in renames:
            raise ConfigError(
                f"--rename: expected OURS=REF once per teacher, found {pair!r}",
                hint="e.g. --rename dinov2=dino2reg_vitlarge_14",
            )
        renames[ours] = ref
    return renames


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="The preset, e.g. dune_vitb14.")],
    folder: Annotated[Path, typer.Argument(help="Where to write its config files.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the preset's files in FOLDER.")
    ] = False,
) -> None:
    """Write a shipped recipe (train.toml and its caches' configs) into FOLDER to edit."""
    from train.presets import write_preset

    console = Console()
    for path in write_preset(name, folder, overwrite=overwrite):
        console.print(f"wrote {path}")
    console.print("next: set the dataset roots and teacher checkpoints in the cache configs, "
                  "build each cache with dune-cache build, then dune-train fit train.toml")


def print_fit_summary(summary: dict[str, Any], console: Console) -> None:
    """A table of each teacher's loss and held-out cosine at the start and the end."""
    rows = summary["rows"]
    table = Table(title=f"dune-train: {summary['step']} steps, {summary['images_per_s']:.1f} img/s")
    for column in ("teacher", "loss first", "loss last", "held-out cos start", "held-out cos end"):
        table.add_column(column)
    for teacher in summary["teachers"]:
        l0, l1 = first_last(rows, f"loss/{teacher}")
        c0, c1 = first_last(rows, f"heldout/cos/{teacher}", kind="eval")
        table.add_row(teacher, f"{l0:.4f}", f"{l1:.4f}", f"{c0:.3f}", f"{c1:.3f}")
    console.print(table)
    run_dir = Path(summary["run_dir"])
    console.print(f"run folder   {run_dir}")
    console.print(f"metrics      {run_dir / 'metrics.jsonl'}")
    console.print(f"loss curves  {run_dir / 'curves' / 'losses.png'} (TensorBoard: "
                  f"{run_dir / 'tensorboard'})")
    console.print(f"checkpoints  {run_dir / 'checkpoints'}")


def main() -> None:
    """Console-script entry point: our errors become one line and a hint (see `run_cli`)."""
    run_cli(app, interrupted="interrupted; rerun the same command to resume from the last "
            "checkpoint")


if __name__ == "__main__":
    main()
