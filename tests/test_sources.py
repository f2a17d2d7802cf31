"""Dataset sources: listing, loading, bad images with their reasons, pickling, fingerprints."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import pickle
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cache_format.errors import BadImageError, ConfigError
from cache_format.manifest import keys_sha256
from cache_format.serde import from_dict, to_dict
from precompute.dataset_keys import DatasetConfig
from precompute.decode import SKIP_REASONS, decode_image
from precompute.sources import ImageSource, open_source
from precompute.synthetic import (
    BAD_FILE_NAMES,
    BAD_KINDS,
    bad_image_bytes,
    make_bad_images,
    make_hdf5_dataset,
    make_image_folder,
    make_list_dataset,
    png_bytes,
    synthetic_image,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("sources")
    folder_keys = make_image_folder(root / "folder", 12, (16, 40), seed=1, bad=True)
    list_file, list_keys = make_list_dataset(root / "list", 8, (16, 40), seed=2, bad=True)
    hdf5_keys = make_hdf5_dataset(root / "data.h5", 8, (16, 40), seed=3, bad=True)
    return {
        "root": root,
        "folder": DatasetConfig(name="f", kind="folder", root=str(root / "folder"), domain="2d"),
        "folder_keys": folder_keys,
        "list": DatasetConfig(
            name="l", kind="list", root=str(root / "list"), list_file=list_file, domain="3d"
        ),
        "list_keys": list_keys,
        "hdf5": DatasetConfig(
            name="h", kind="hdf5", root=str(root / "data.h5"), hdf5_key="images", domain="human"
        ),
        "hdf5_keys": hdf5_keys,
    }


def _pil_rgb(data: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _good(source: ImageSource) -> list[int]:
    bad_names = set(BAD_FILE_NAMES.values())
    return [i for i, key in enumerate(source.keys()) if key.split("/")[-1] not in bad_names]


@pytest.mark.parametrize("kind", ["folder", "list", "hdf5"])
def test_each_kind_lists_and_loads(data: dict[str, object], kind: str) -> None:
    cfg = data[kind]
    source = open_source(cfg)
    keys = data[f"{kind}_keys"]
    assert source.keys() == keys and len(source) == len(keys)
    if kind == "folder":
        assert keys == sorted(keys)
    good = _good(source)
    assert len(good) == len(keys) - (len(BAD_KINDS) - (kind == "hdf5"))
    for i in good:
        image = source.load(i)
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        assert 16 <= image.shape[1] <= 40 and 16 <= image.shape[2] <= 40
        assert torch.equal(image, _pil_rgb(source.read_bytes(i)))
    if kind != "hdf5":
        path = os.path.join(cfg.root, keys[good[0]])
        assert source.read_bytes(good[0]) == Path(path).read_bytes()
    sizes = {tuple(source.load(i).shape) for i in good}
    assert len(sizes) > 3  # varied sizes and aspect ratios


@pytest.mark.parametrize("kind", ["folder", "list", "hdf5"])
def test_describe_is_the_fingerprint(data: dict[str, object], kind: str) -> None:
    source = open_source(data[kind])
    info = source.describe()
    keys = data[f"{kind}_keys"]
    expected = hashlib.sha256(b"".join(k.encode() + b"\0" for k in keys)).hexdigest()
    assert info == {
        "name": data[kind].name,
        "source_kind": kind,
        "root": data[kind].root,
        "num_images": len(keys),
        "keys_sha256": expected,
        "domain": data[kind].domain,
    }
    assert keys_sha256(keys[::-1]) != expected  # order matters


@pytest.mark.parametrize("kind", ["folder", "list", "hdf5"])
def test_each_bad_kind_raises_its_reason(data: dict[str, object], kind: str) -> None:
    source = open_source(data[kind])
    by_name = {key.split("/")[-1]: i for i, key in enumerate(source.keys())}
    seen = set()
    for bad_kind, reason in BAD_KINDS.items():
        if kind == "hdf5" and bad_kind == "unreadable":
            continue  # an I/O error cannot live in a file's content
        i = by_name[BAD_FILE_NAMES[bad_kind]]
        with pytest.raises(BadImageError) as info:
            source.load(i)
        assert info.value.reason == reason, bad_kind
        assert info.value.path == source.location(i)
        assert source.location(i) in str(info.value)
        seen.add(reason)
    assert seen | ({"unreadable"} if kind == "hdf5" else set()) == set(SKIP_REASONS)


def test_too_large_is_checked_from_the_header_without_warnings() -> None:
    bad = bad_image_bytes()["too_large"]  # 1e8 pixels declared, a few bytes of data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any leaked Pillow warning fails the test
        with pytest.raises(BadImageError, match="10000x10000") as info:
            decode_image(bad, "big.png")
        assert info.value.reason == "too_large"
        huge = png_bytes(20_000, 20_000, 8, 0, b"\0" * 64)  # beyond Pillow's own hard limit
        with pytest.raises(BadImageError) as info:
            decode_image(huge, "huge.png")
        assert info.value.reason == "too_large"
    small = bad_image_bytes()["cmyk"]
    with pytest.raises(BadImageError, match="exceeds the limit of 100") as info:
        decode_image(small, "small.jpg", max_pixels=100, unusual_modes="convert")
    assert info.value.reason == "too_large"


def test_convert_mode_converts_unusual_images() -> None:
    bad = bad_image_bytes()
    pixels = torch.from_numpy(synthetic_image(np.random.default_rng(12345), 64, 80))
    pixels = pixels.permute(2, 0, 1)

    cmyk = decode_image(bad["cmyk"], "cmyk.jpg", unusual_modes="convert")
    assert cmyk.shape == (3, 64, 80)
    assert (cmyk.float() - pixels.float()).abs().mean() < 6  # JPEG loss only

    palette = decode_image(bad["palette"], "palette.png", unusual_modes="convert")
    assert palette.shape == (3, 64, 80)
    assert (palette.float() - pixels.float()).abs().mean() < 20  # 16-colour quantisation

    gray16 = decode_image(bad["sixteen_bit"], "g16.png", unusual_modes="convert")
    values = np.arange(48 * 40).reshape(48, 40) * 34
    expected = torch.from_numpy(np.rint(values / 257).astype(np.uint8))
    assert torch.equal(gray16, expected.expand(3, 48, 40))

    rgb16 = decode_image(bad["sixteen_bit_rgb"], "rgb16.png", unusual_modes="convert")
    assert torch.equal(rgb16, pixels[:, :16, :20])  # each sample was p * 257: high byte = p

    # Transparent palettes and alpha are dropped, not refused, in convert mode.
    rgba = Image.fromarray(np.full((6, 7, 4), 200, dtype=np.uint8))
    buffer = io.BytesIO()
    rgba.convert("P").save(buffer, format="PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode_image(buffer.getvalue(), "t.png", unusual_modes="convert")
    assert out.shape == (3, 6, 7)
    with pytest.raises(BadImageError) as info:
        decode_image(buffer.getvalue(), "t.png")
    assert info.value.reason == "unsupported_mode"


def test_grayscale_images_become_rgb() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6)).save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), "g.png")
    assert out.shape == (3, 5, 6)
    assert torch.equal(out[0], out[2]) and int(out[0, 4, 5]) == 29


def _load_in_child(source: ImageSource, index: int, queue: multiprocessing.Queue) -> None:
    queue.put(source.load(index).numpy())


@pytest.mark.parametrize("kind", ["folder", "list", "hdf5"])
def test_sources_survive_pickling_and_forking(data: dict[str, object], kind: str) -> None:
    source = open_source(data[kind])
    i = _good(source)[0]
    expected = source.load(i)  # opens the HDF5 handle in this process
    clone = pickle.loads(pickle.dumps(source))
    assert clone.keys() == source.keys() and clone.describe() == source.describe()
    assert torch.equal(clone.load(i), expected)
    if kind == "hdf5":
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_load_in_child, args=(source, i, queue))
        child.start()
        result = queue.get(timeout=30)
        child.join(timeout=30)
        assert child.exitcode == 0
        assert np.array_equal(result, expected.numpy())
        source.close()
        assert torch.equal(source.load(i), expected)  # reopens


@pytest.mark.parametrize("kind", ["folder", "list", "hdf5"])
def test_a_slice_keeps_the_dataset_indices_and_pickles_its_own_keys(
    data: dict[str, object], kind: str
) -> None:
    source = open_source(data[kind])
    first, stop = 2, 6
    part = pickle.loads(pickle.dumps(source.slice(first, stop)))
    assert type(part) is type(source) and (part.first, part.stop, len(part)) == (first, stop, 4)
    assert part.keys() == source.keys()[first:stop]
    for i in range(first, stop):
        assert part.key(i) == source.key(i) and part.location(i) == source.location(i)
        assert part.read_bytes(i) == source.read_bytes(i)
        try:
            expected = source.load(i)
        except BadImageError as exc:
            with pytest.raises(BadImageError) as info:
                part.load(i)
            assert (info.value.reason, info.value.path) == (exc.reason, exc.path)
        else:
            assert torch.equal(part.load(i), expected)
    assert part.slice(3, 5).keys() == source.keys()[3:5]  # a slice of a slice
    for outside in (first - 1, stop):
        with pytest.raises(IndexError, match=rf"out of range \[{first}, {stop}\)"):
            part.read_bytes(outside)
    with pytest.raises(IndexError, match="not within"):
        source.slice(0, len(source) + 1)
    with pytest.raises(ValueError, match="only a whole source describes"):
        part.describe()
    part.close()


def test_check_root_refuses_a_root_that_is_not_there(data: dict[str, object],
                                                     tmp_path: Path) -> None:
    for kind in ("folder", "hdf5"):
        open_source(data[kind]).slice(0, 1).check_root()  # there: no error
    gone = open_source(data["folder"]).slice(0, 1)
    gone.cfg = DatasetConfig(name="f", kind="folder", root=str(tmp_path / "unmounted"),
                             domain="2d")
    with pytest.raises(ConfigError, match=r"'f': root .*unmounted.* is not there"):
        gone.check_root()


def test_folder_listing_rules(tmp_path: Path) -> None:
    make_image_folder(tmp_path, 3, (8, 12), seed=0, subfolders=1)
    (tmp_path / "notes.txt").write_text("not listed")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "a.png").write_bytes(b"x")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "UPPER.JPG").write_bytes(b"x")
    (tmp_path / "deep" / "loop").symlink_to(tmp_path)  # a symlink loop is listed once
    source = open_source(DatasetConfig(name="x", kind="folder", root=str(tmp_path), domain="d"))
    keys = source.keys()
    assert keys == sorted(keys)
    assert "deep/er/UPPER.JPG" in keys and "notes.txt" not in keys
    assert not any(k.startswith(".") or "/." in k for k in keys)
    assert sum(k.endswith("UPPER.JPG") for k in keys) == 1 and len(keys) == 4


def test_max_images_keeps_the_first_and_changes_the_fingerprint(data: dict[str, object]) -> None:
    cfg = data["list"]
    full = open_source(cfg)
    cut = open_source(DatasetConfig(**{**vars(cfg), "max_images": 3}))
    assert cut.keys() == full.keys()[:3]
    assert cut.describe()["keys_sha256"] != full.describe()["keys_sha256"]


def test_hdf5_without_keys_uses_row_numbers(tmp_path: Path) -> None:
    keys = make_hdf5_dataset(tmp_path / "n.h5", 3, (8, 12), seed=0, key="pix", with_keys=False)
    source = open_source(
        DatasetConfig(name="n", kind="hdf5", root=str(tmp_path / "n.h5"), hdf5_key="pix",
                      domain="d")  # fmt: skip
    )
    assert source.keys() == keys == ["000000000", "000000001", "000000002"]
    assert source.load(2).shape[0] == 3


def test_synthetic_data_is_deterministic(tmp_path: Path) -> None:
    a = make_image_folder(tmp_path / "a", 6, (8, 30), seed=5)
    b = make_image_folder(tmp_path / "b", 6, (8, 30), seed=5)
    c = make_image_folder(tmp_path / "c", 6, (8, 30), seed=6)
    assert a == b
    for key in a:
        assert (tmp_path / "a" / key).read_bytes() == (tmp_path / "b" / key).read_bytes()
    a_bytes = [(tmp_path / "a" / key).read_bytes() for key in a]
    assert a_bytes != [(tmp_path / "c" / key).read_bytes() for key in c]
    assert make_bad_images(tmp_path / "bad") == make_bad_images(tmp_path / "bad")  # rerunnable


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"domain": "two words"}, "domain"),
        ({"kind": "zip"}, "kind"),
        ({"root": ""}, "root"),
        ({"kind": "list"}, "list_file"),
        ({"kind": "hdf5"}, "hdf5_key"),
        ({"hdf5_key": "images"}, "hdf5_key"),
        ({"max_images": 0}, "max_images"),
    ],
)
def test_dataset_config_validation_names_the_field(changes: dict[str, object], field: str) -> None:
    base = {"name": "ds", "kind": "folder", "root": "/data", "domain": "2d"}
    with pytest.raises(ConfigError, match=rf"DatasetConfig\.{field}"):
        DatasetConfig(**{**base, **changes})


def test_dataset_config_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        DatasetConfig("ds", "folder", "/data", "2d")  # type: ignore[misc]


def test_open_source_errors_name_the_problem(tmp_path: Path, data: dict[str, object]) -> None:
    def cfg(**kw: object) -> DatasetConfig:
        return DatasetConfig(**{"name": "e", "kind": "folder", "root": str(tmp_path),
                                "domain": "d", **kw})  # fmt: skip

    with pytest.raises(ConfigError, match="no images found"):
        open_source(cfg())
    with pytest.raises(ConfigError, match="existing folder"):
        open_source(cfg(root=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="cannot be read"):
        open_source(cfg(kind="list", list_file=str(tmp_path / "missing.txt")))
    listing = tmp_path / "l.txt"
    listing.write_text("a.jpg\n\nb.jpg\na.jpg\n")
    with pytest.raises(ConfigError, match="line 4: 'a.jpg' repeats line 1"):
        open_source(cfg(kind="list", list_file=str(listing)))
    listing.write_text("/abs/a.jpg\n")
    with pytest.raises(ConfigError, match="line 1: '/abs/a.jpg' is absolute"):
        open_source(cfg(kind="list", list_file=str(listing)))
    h5 = data["hdf5"]
    with pytest.raises(ConfigError, match=r"no dataset 'nope'.*images_keys"):
        open_source(DatasetConfig(**{**vars(h5), "hdf5_key": "nope"}))
    with h5py.File(tmp_path / "fixed.h5", "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4), dtype=np.uint8))
    with pytest.raises(ConfigError, match="must be 1-D rows of encoded files"):
        open_source(DatasetConfig(**{**vars(h5), "root": str(tmp_path / "fixed.h5")}))
    good = data["folder"]
    with pytest.raises(ConfigError, match="unusual_modes"):
        open_source(good, unusual_modes="keep")
    with pytest.raises(ConfigError, match="Pillow's hard limit"):
        open_source(good, max_pixels=10**12)


def test_dataset_config_round_trips_through_serde(data: dict[str, object]) -> None:
    for kind in ("folder", "list", "hdf5"):
        cfg = data[kind]
        assert from_dict(DatasetConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(DatasetConfig, {**to_dict(data["folder"]), "path": "x"})


def test_a_source_holds_its_keys_without_a_python_object_per_key(tmp_path: Path) -> None:
    """DataLoader workers fork with the training dataset's sources: keys held as Python str
    objects would be copied page by page as their refcounts change, so they are numpy strings."""
    make_image_folder(tmp_path / "imgs", 6, size_range=(16, 24), seed=0)
    source = open_source(DatasetConfig(name="x", kind="folder", root=str(tmp_path / "imgs"),
                                         domain="2d"))
    held = source._keys  # the private field is the point of this test
    assert isinstance(held, np.ndarray) and held.dtype.kind == "T"
    assert source.keys() == [source.key(i) for i in range(len(source))]
    assert all(type(k) is str for k in source.keys())
    part = source.slice(2, 5)
    assert part.keys() == source.keys()[2:5] and part.key(3) == source.key(3)
    assert pickle.loads(pickle.dumps(part)).keys() == part.keys()
