"""Shipped recipes: a training config and the cache configs it reads, installed with the package.

`dune_vitb14`: DUNE's ViT-B/14 recipe (`train/presets/dune_vitb14.toml`) and its two caches
(`precompute/presets/dune_vitb14_336.toml`, `..._448.toml`). `write_preset` copies them into a
folder as train.toml, cache_336.toml and cache_448.toml, so that their relative paths
(`caches/...`, `weights/...`) are taken from that folder; edit the dataset roots and
checkpoint paths there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cache_format.errors import ConfigError

#: Each preset: {file name written: (package, resource)}.
PRESETS: dict[str, dict[str, tuple[str, str]]] = {
    "dune_vitb14": {
        "train.toml": ("train.presets", "dune_vitb14.toml"),
        "cache_336.toml": ("precompute.presets", "dune_vitb14_336.toml"),
        "cache_448.toml": ("precompute.presets", "dune_vitb14_448.toml"),
    },
}


def preset_files(name: str) -> dict[str, str]:
    """{file name: text} of preset `name`; an unknown name lists the known ones."""
    if name not in PRESETS:
        raise ConfigError(
            f"preset {name!r}: not a shipped preset; known presets are {', '.join(PRESETS)}"
        )
    return {
        out: resources.files(package).joinpath(resource).read_text()
        for out, (package, resource) in PRESETS[name].items()
    }


def write_preset(name: str, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy preset `name`'s files into `folder`; refuses to overwrite unless asked."""
    out = Path(folder)
    files = preset_files(name)
    existing = [out / f for f in files if (out / f).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]}: exists already",
            hint="pick another folder, or pass --overwrite to replace the preset's files",
        )
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, text in files.items():
        (out / file).write_text(text)
        written.append(out / file)
    return written
