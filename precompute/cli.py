"""`dune-cache`: build a teacher-token cache, describe it, verify it, find caches.

    dune-cache build CONFIG.toml [--cache PATH] [--scheduler ADDR] [--workers N] [--strict]
                                 [--dry-run] [--redo-damaged]
    dune-cache info PATH [--json]
    dune-cache verify PATH [--recompute N] [--config BUILD.toml] [--trust-cache-code]
    dune-cache transcode CACHE --encoding NAME --out NEW [--codec C] [--level L]
                               [--calibration-samples N]
    dune-cache ls DIR [--skipped]

Commands parse their arguments and call one library function. `main()` turns the project's own
errors into one line and a hint (DUNE_DEBUG=1 re-raises them with the traceback).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cache_format.errors import run_cli
from cache_format.manifest import FORMAT_VERSION

app = typer.Typer(
    name="dune-cache",
    help="Build and inspect DUNE teacher-token caches (stage one of DUNE distillation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@app.command()
def build(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="The build config (TOML).")],
    cache: Annotated[str | None, typer.Option(
        help="Cache path; overrides `cache` in the config.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        help="Run on an existing dask cluster (tcp://host:port) instead of a local one.")] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Local workers (default: one per GPU, or 1 on CPU); with --scheduler, wait "
                    "for this many workers.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Stop at the first bad image instead of skipping it.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (work, sizes, free space) and touch nothing.")] = False,
    redo_damaged: Annotated[bool, typer.Option(
        "--redo-damaged", help="First verify the cache (reads every byte) and mark the damaged "
                               "shards as never written, so that this build recomputes exactly "
                               "those.")] = False,
) -> None:
    """Run every teacher once over the data mix and write (or resume, or extend) the cache."""
    from precompute.build import build_cache
    from precompute.build_lock import build_lock
    from precompute.config import load_build_config
    from precompute.plan import make_plan, plan_lines, plan_table
    from precompute.results import summary_tables

    cfg = load_build_config(config, {"cache": cache})
    if dry_run:
        plan = make_plan(cfg)
        out.print(plan_table(plan))
        for line in plan_lines(plan):
            out.print(line, soft_wrap=True)
        out.print("dry run: nothing was written")
        return
    resume = shlex.join(["dune-cache", "build", str(config), "--cache", cfg.cache])
    with build_lock(cfg.cache):  # held from the plan to the end: one build at a time
        if redo_damaged:
            from cache_format.locate import probe_cache
            from precompute.cache_tools import redo_damaged as forget_damaged

            if probe_cache(cfg.cache) == "cache":
                marked = forget_damaged(cfg.cache)
                err.print(f"--redo-damaged: {len(marked)} damaged shard(s) to recompute"
                          + (": " + ", ".join(marked) if marked else ""), soft_wrap=True)
        plan = make_plan(cfg)
        for line in plan_lines(plan):
            err.print(line, soft_wrap=True)
        summary = build_cache(cfg, scheduler=scheduler, workers=workers, strict=strict,
                              console=err, plan=plan, resume=resume)
    for table in summary_tables(summary):
        out.print(table)
    if plan.nothing_to_do:  # no rate, no time: nothing was computed
        out.print(f"cache: {cfg.cache} ({_size(summary.cache_bytes)} on disk), already "
                  "complete: nothing was computed", soft_wrap=True)
        return
    out.print(f"cache: {cfg.cache} ({_size(summary.cache_bytes)} on disk, "
              f"{summary.seconds:.1f} s)", soft_wrap=True)


def _info_tables(info: dict) -> list[Table]:
    head = Table(title=f"cache {info['path']}", show_header=False)
    enc = info["encoding"]
    for key, value in (
        ("format version", info["format_version"]),
        ("grid", f"{info['grid'][0]}x{info['grid'][1]} (student patch {info['student_patch']})"),
        ("views", f"{info['views_per_image']} per image ({info['view_mode']}), seed "
                  f"{info['seed']}"),
        ("encoding", f"{enc['name']}, codec {enc['codec']}"),
        ("size", _size(info["bytes"])),
        ("complete", "yes" if info["complete"] else "NO (resume the build)" if not
         info["damaged"] else "NO (damaged: run `dune-cache verify`)"),
    ):
        head.add_row(key, str(value))
    for line in [*info["missing"], *info["damaged"]]:
        head.add_row("", escape(line))
    teachers = Table(title="teachers")
    for column in ("name", "arch", "dim", "tokens", "input", "checkpoint"):
        teachers.add_column(column)
    for t in info["teachers"]:
        arch = t["arch"] if len(t["arch"]) <= 40 else t["arch"][:39] + "…"
        teachers.add_row(t["name"], arch, str(t["dim"]), ",".join(t["token_types"]),
                         "x".join(map(str, t["input_size"])), t["checkpoint_sha256"][:24])
    datasets = Table(title="datasets")
    for column in ("name", "kind", "images", "samples", "statuses", "index", "root"):
        datasets.add_column(column)
    for d in info["datasets"]:
        statuses = ", ".join(f"{k} {v}" for k, v in d["statuses"].items())
        datasets.add_row(d["name"], d["source_kind"], str(d["num_images"]), str(d["samples"]),
                         statuses, f"{d['index_shards_done']}/{d['index_shards']}", d["root"])
    pairs = Table(title="tokens per teacher and dataset")
    for column in ("teacher", "dataset", "shards", "stats", "size", "out of range"):
        pairs.add_column(column)
    for p in info["pairs"]:
        outside = ", ".join(f"{tok} {frac:.3%}" for tok, frac in p["out_of_range"].items())
        pairs.add_row(p["teacher"], p["dataset"], f"{p['shards_done']}/{p['shards']}",
                      "final" if p["stats_final"] else "not final", _size(p["bytes"]),
                      outside or "-")
    return [head, teachers, datasets, pairs]


@app.command()
def info(
    path: Annotated[str, typer.Argument(metavar="PATH", help="The cache (folder or URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the same facts as JSON.")] = False,
) -> None:
    """Manifest, sizes per teacher and dataset, encoding and completeness of a cache."""
    from precompute.cache_tools import cache_info

    facts = cache_info(path)
    if as_json:
        print(json.dumps(facts, indent=2))
        return
    for table in _info_tables(facts):
        out.print(table)


@app.command()
def verify(
    path: Annotated[str, typer.Argument(metavar="PATH", help="The cache (folder or URL).")],
    recompute: Annotated[int, typer.Option(
        min=0, help="Re-run the teachers on N random cached views and compare.")] = 0,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Your own build config: --recompute takes teacher definitions from it "
                         "(by name) instead of the cache's record.")] = None,
    trust_cache_code: Annotated[bool, typer.Option(
        "--trust-cache-code", help="Let --recompute run `factory:` teachers named inside the "
                                   "cache (imports their code); only for caches you trust.")
    ] = False,
) -> None:
    """Read every chunk (checksums), check counts; exit 1 on any problem."""
    from precompute.cache_tools import verify_cache

    own = None
    if config is not None:
        from precompute.config import load_build_config

        own = load_build_config(config, {"cache": path})
    result = verify_cache(path, recompute=recompute, trust=trust_cache_code, own=own)
    out.print(f"{result.shards_checked} token shard(s) read, checksums checked")
    for entry in result.recompute:
        out.print(f"recompute {entry['teacher']}: {entry['tokens']} tokens, cosine mean "
                  f"{entry['mean']:.6f}, p01 {entry['p01']:.6f}, min {entry['min']:.6f} "
                  f"(floor {entry['floor']})", soft_wrap=True)
    for problem in result.problems:
        out.print(f"[red]problem:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if not result.ok:
        out.print(f"[red]{len(result.problems)} problem(s) found in {escape(path)}[/]")
        if result.damaged_shards:
            out.print(f"repair: dune-cache build CONFIG.toml --redo-damaged (recomputes the "
                      f"{len(result.damaged_shards)} damaged shard(s))", soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"[green]ok[/]: {escape(path)}")


@app.command()
def upgrade(
    path: Annotated[str, typer.Argument(metavar="CACHE", help="The cache (folder or URL).")],
) -> None:
    """Rewrite an older cache's metadata to the current format in place (token shards are
    never touched); safe to interrupt and run again."""
    from cache_format.upgrade import upgrade_cache
    from precompute.replay_spec import replay_spec_from_build_config

    report = upgrade_cache(
        path, replay_of=lambda build: replay_spec_from_build_config(build).to_dict())
    if not report.manifest_changed and not report.converted:
        out.print(f"{escape(path)}: already format version {FORMAT_VERSION}, nothing to do")
        return
    out.print(f"{escape(path)}: format version {report.found_version} -> {FORMAT_VERSION} "
              f"({len(report.converted)} group(s) converted)")


@app.command()
def transcode(
    cache: Annotated[str, typer.Argument(metavar="CACHE", help="The source cache (complete).")],
    encoding: Annotated[str, typer.Option(metavar="NAME", help="Encoding of the new cache.")],
    out_path: Annotated[str, typer.Option("--out", metavar="NEW", help="The new cache.")],
    codec: Annotated[str, typer.Option(help="Lossless codec of the new cache.")] = "none",
    level: Annotated[int, typer.Option(help="zstd / blosc level.")] = 3,
    calibration_samples: Annotated[int | None, typer.Option(
        min=1, help="int8, int4, int4h: calibration sample (default: the source build's).")
    ] = None,
) -> None:
    """Derive a cache in another encoding from an existing one, without any teacher; rerun the
    same command to resume."""
    from cache_format.encodings import EncodingSpec
    from precompute.transcode import transcode as run_transcode

    report = run_transcode(cache, out_path, EncodingSpec(encoding, codec, level),
                           calibration_samples=calibration_samples)
    out.print(f"{escape(report.out)}: {report.encoding}, {report.shards_written} token shard(s) "
              f"written, {report.shards_skipped} already done", soft_wrap=True)


@app.command(name="ls")
def list_caches(
    folder: Annotated[str, typer.Argument(metavar="DIR", help="A folder to search for caches.")],
    skipped: Annotated[bool, typer.Option(
        "--skipped", help="DIR is a cache: list the images the build skipped, with their "
                          "reasons (dataset, image index, key, reason; tab-separated).")] = False,
) -> None:
    """The caches under a folder, one line each (with --skipped: a cache's skipped images)."""
    from precompute.cache_tools import find_caches, skipped_images

    if skipped:
        rows = skipped_images(folder)
        for row in rows:
            print(f"{row['dataset']}\t{row['image']}\t{row['key']}\t{row['reason']}")
        err.print(f"{len(rows)} skipped image(s) in {folder}")
        return

    caches = find_caches(folder)
    for c in caches:
        grid = "x".join(map(str, c["grid"] or []))
        print(f"{c['path']}  {_size(c['bytes'])}  grid {grid}  {c['encoding']}  "
              f"{c['samples']} samples  teachers {','.join(c['teachers'])}  "
              f"datasets {','.join(c['datasets'])}")
    if not caches:
        err.print(f"no cache under {folder}")


def main() -> None:
    """Console-script entry point: our errors become one line and a hint (see `run_cli`)."""
    run_cli(app, interrupted="interrupted; rerun the same command to resume (finished shards "
            "are kept)")


if __name__ == "__main__":
    main()
