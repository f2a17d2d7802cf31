"""`dune-heads`: frozen-encoder heads, evaluation, comparison and PCA pictures.

    dune-heads features ENCODER DATA --out CACHE --task segmentation
    dune-heads fit TASK --features CACHE --out RUN
    dune-heads eval RUN
    dune-heads compare RUN... --out DIR
    dune-heads pca IMAGES... --encoder ENC [--encoder ENC ...] --out DIR

Thin commands: each parses its options, builds a config and calls one library function.
docs/heads.md documents every option.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cache_format.encodings import ENCODING_NAMES
from cache_format.errors import run_cli
from heads.datasets import OnBad, Task

app = typer.Typer(help="Frozen-encoder heads on DUNE students, teachers and other encoders.",
                  no_args_is_help=True, add_completion=False)
console = Console()


class DataKind(enum.StrEnum):
    """Layouts of labelled data (auto: guessed from the folder)."""

    auto = "auto"
    imagefolder = "imagefolder"
    ade20k = "ade20k"
    nyu_mat = "nyu-mat"
    seg_folder = "seg-folder"
    depth_folder = "depth-folder"


#: How the features cache stores tokens: every encoding of the cache format, by its name.
Encoding = enum.StrEnum("Encoding", {name: name for name in ENCODING_NAMES})


Device = Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:1, ...")]


@app.command()
def features(
    encoder: Annotated[str, typer.Argument(help="Encoder string, e.g. student:RUN, "
                                           "student:EXPORT@dinov2, dune:FILE.pth@TEACHER, "
                                           "teacher:KIND, teacher:NAME@cache.toml, timm:MODEL.")],
    data: Annotated[Path, typer.Argument(help="Labelled data: a folder or the NYU .mat file.")],
    out: Annotated[Path, typer.Option(help="Features folder to write.")],
    task: Annotated[Task, typer.Option(help="Which labels to read.")] = Task.segmentation,
    kind: Annotated[DataKind, typer.Option(help="Data layout.")] = DataKind.auto,
    grid: Annotated[int, typer.Option(help="Token grid side; images are resized to "
                                      "grid x the encoder's patch.")] = 32,
    label_size: Annotated[int | None, typer.Option(help="Side of stored label maps "
                                                   "(default grid x 14).")] = None,
    encoding: Annotated[Encoding, typer.Option(help="Token encoding.")] = Encoding.fp16,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward.")] = 32,
    samples_per_shard: Annotated[int, typer.Option(help="Samples per cache shard.")] = 256,
    val_fraction: Annotated[float, typer.Option(help="Val share if no split.")] = 0.2,
    val_list: Annotated[str | None, typer.Option(help="File listing the val images (relative "
                                                 "paths, or 1-based NYU indices).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the val split.")] = 0,
    on_bad: Annotated[OnBad, typer.Option(help="Bad pairs: skip and count, or stop.")] = OnBad.skip,
    ignore_index: Annotated[int, typer.Option(help="Unlabelled mask value (seg-folder).")] = 255,
    depth_scale: Annotated[float, typer.Option(help="16-bit depth PNG value per metre.")] = 1000.0,
    checkpoint: Annotated[str | None, typer.Option(help="Weights for teacher:KIND / timm:MODEL."
                                                   )] = None,
    pretrained: Annotated[bool, typer.Option(help="Hub weights for timm:MODEL.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing features folder.")] = False,
    device: Device = "cpu",
) -> None:
    """Compute an encoder's tokens on a labelled dataset once (a cache_format cache)."""
    from heads.encoders import load_encoder
    from heads.features import FeaturesConfig, extract_features

    cfg = FeaturesConfig(task=task.value, data=str(data), data_kind=kind.value, grid=grid,
                         label_size=label_size, encoding=encoding.value, batch_size=batch_size,
                         samples_per_shard=samples_per_shard, val_fraction=val_fraction,
                         val_list=val_list, seed=seed, on_bad=on_bad.value,
                         ignore_index=ignore_index, depth_scale=depth_scale)
    enc = load_encoder(encoder, checkpoint=checkpoint, pretrained=pretrained, device=device)
    info = extract_features(enc, cfg, out, overwrite=overwrite, log=console.log)
    splits = ", ".join(f"{s} {c['ok']}" + (f" ({c['failed']} failed)" if c["failed"] else "")
                       for s, c in info["splits"].items())
    console.print(f"features of {enc.name} written to {out}: {splits}; "
                  f"{len(info['skipped'])} bad pair(s) left out in {info['seconds']:.0f} s")
    for bad in info["skipped"][:10]:
        console.print(f"  skipped {bad['image']} / {bad['label']}: {bad['reason']}")


@app.command()
def fit(
    task: Annotated[Task, typer.Argument(help="Head task (must match the features' labels).")],
    features: Annotated[Path, typer.Option(help="Features folder (`dune-heads features`).")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    lr: Annotated[list[float] | None, typer.Option(help="Learning rates of the grid "
                                                   "(repeat the option).")] = None,
    weight_decay: Annotated[list[float] | None, typer.Option(help="Weight decays of the grid "
                                                             "(repeat).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the train features.")] = 10,
    batch_size: Annotated[int | None, typer.Option(help="Default: 256 classification, "
                                                   "16 dense.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of head init and batch order.")] = 0,
    depth_bins: Annotated[int, typer.Option(help="Depth bins.")] = 256,
    min_depth: Annotated[float, typer.Option(help="Smallest depth (metres).")] = 1e-3,
    max_depth: Annotated[float, typer.Option(help="Largest depth (metres).")] = 10.0,
    preload_gb: Annotated[float, typer.Option(help="Hold a split in memory up to this size.")
                          ] = 4.0,
    device: Device = "cpu",
) -> None:
    """Train a grid of linear heads (one per lr x weight decay); keep the best on val."""
    from heads.fit import HeadConfig, fit_heads

    defaults = HeadConfig(task=task.value, features=str(features))
    cfg = HeadConfig(task=task.value, features=str(features), lrs=tuple(lr or defaults.lrs),
                     weight_decays=tuple(weight_decay or defaults.weight_decays), epochs=epochs,
                     batch_size=batch_size, seed=seed, device=device, depth_bins=depth_bins,
                     min_depth=min_depth, max_depth=max_depth, preload_gb=preload_gb)
    res = fit_heads(cfg, out, log=console.log)
    table = Table(title=f"{res['encoder']['name']} {task.value} heads (val); best = *")
    table.add_column("lr")
    table.add_column("weight decay")
    metrics = list(res["metrics"])
    for m in metrics:
        table.add_column(m, justify="right")
    for i, g in enumerate(res["grid"]):
        mark = " *" if i == res["best"] else ""
        table.add_row(f"{g['lr']:g}{mark}", f"{g['weight_decay']:g}",
                      *(f"{g['val'][m]:.3f}" for m in metrics))
    console.print(table)
    console.print(f"run written to {out} ({res['seconds']:.0f} s)")


@app.command("eval")
def evaluate(
    run: Annotated[Path, typer.Argument(help="A `dune-heads fit` run folder.")],
    features: Annotated[Path | None, typer.Option(help="Other features (same encoder and "
                                                  "task); default: the run's.")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "val",
    device: Device = "cpu",
) -> None:
    """Evaluate a run's best head; writes RUN/eval_<split>.json."""
    from heads.fit import evaluate_run

    res = evaluate_run(run, str(features) if features else None, split, device)
    values = ", ".join(f"{k} {v:.3f}" for k, v in res["metrics"].items())
    console.print(f"{run} on {res['features']} [{split}, {res['samples']} samples]: {values}")


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run folders, or folders holding them.")],
    out: Annotated[Path | None, typer.Option(help="Write compare.json and compare.md here.")
                   ] = None,
) -> None:
    """Encoders x tasks: a table of the best heads' val metrics (+ JSON and markdown)."""
    from heads.compare import compare_runs, to_rich, write_comparison

    table = compare_runs(runs)
    console.print(to_rich(table))
    if out is not None:
        paths = write_comparison(table, out)
        console.print(f"written: {paths[0]}  {paths[1]}")


@app.command()
def pca(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    encoder: Annotated[list[str], typer.Option(help="Encoder string (repeat: one panel each; "
                                               "teacher:*@CONFIG adds every teacher).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("pca"),
    grid: Annotated[int, typer.Option(help="Token grid side.")] = 32,
    panel: Annotated[int, typer.Option(help="Panel side in pixels.")] = 224,
    threshold: Annotated[float | None, typer.Option(help="Foreground threshold on the first "
                                                    "component, in [0, 1] (off by default).")
                         ] = None,
    invert_foreground: Annotated[bool, typer.Option(help="Foreground below the threshold.")
                                 ] = False,
    checkpoint: Annotated[str | None, typer.Option(help="Weights for teacher:KIND / timm:MODEL."
                                                   )] = None,
    device: Device = "cpu",
) -> None:
    """One PNG per image: the image and each encoder's patch PCA (3 components as RGB)."""
    from heads.encoders import load_encoders
    from heads.pca import PcaConfig, pca_pictures

    encoders = [e for spec in encoder
                for e in load_encoders(spec, checkpoint=checkpoint, device=device)]
    cfg = PcaConfig(grid=grid, panel=panel, threshold=threshold,
                    invert_foreground=invert_foreground)
    written = pca_pictures([str(p) for p in images], encoders, out, cfg)
    console.print(f"{len(written)} picture(s) in {out}: " + ", ".join(p.name for p in written))


def main() -> None:
    """Entry point: this project's errors become one line and a hint (DUNE_DEBUG=1: traceback)."""
    run_cli(app, interrupted="dune-heads: interrupted")


if __name__ == "__main__":
    main()
