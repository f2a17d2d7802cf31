"""Dataset sources: an ordered list of images with stable keys, decoded to uint8 RGB tensors.

Three kinds, all behind one `ImageSource` interface:
- `folder`: every image file under `root`, recursively (extensions `IMAGE_EXTENSIONS`, any case;
  names starting with "." are ignored; symlinked folders are followed once), keyed by its POSIX
  path relative to `root` and sorted by key, so the order is the same on every machine.
- `list`: the paths in `list_file` (one per line, relative to `root`, blank lines ignored), in
  the file's order; a duplicate path, an absolute path, or one with a `..` part (any path that
  could resolve outside `root`, and any non-canonical spelling of one inside it) is refused.
  Symlinks under `root` are followed wherever they point, for both file kinds: a link inside
  the dataset was put there by whoever owns the dataset, who could as well have copied the file
  in; what a list file (often shipped by someone else) names is held to the root by name.
- `hdf5`: one HDF5 file (`root`) with a 1-D dataset `hdf5_key` whose rows hold whole encoded
  image files (variable-length uint8, variable-length bytes, or opaque). If a dataset named
  `<hdf5_key>_keys` of the same length exists (strings), its rows are the keys; otherwise the
  keys are the zero-padded row numbers. Rows keep the file's order. The file is opened lazily in
  each process (and again after a fork), so the source pickles to DataLoader and dask workers.

`load_fingerprinted(i)` also returns the content fingerprint of the bytes it decoded
(cache_format/source_fingerprint.py), which the builder records and stage two checks.

`max_images` keeps the first images in that order. `describe()` gives the dataset fingerprint;
its `keys_sha256` is the SHA-256 of the keys in order, each encoded as UTF-8 and followed by one
NUL byte.

Decoding (`decode.py`) follows the reference loader but refuses what it would silently mangle:
bad images raise `BadImageError` whose `reason` is one of `precompute.decode.SKIP_REASONS`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import torch
from PIL import Image

from cache_format.errors import ConfigError
from cache_format.manifest import keys_sha256
from cache_format.serde import check_choice
from cache_format.source_fingerprint import fingerprint
from precompute import dataset_keys, url_files
from precompute.dataset_keys import DatasetConfig
from precompute.decode import DEFAULT_MAX_PIXELS, UNUSUAL_MODES, bad_image, decode_image


class ImageSource:
    """An ordered, picklable list of images: `keys()`, `load(i)`, `read_bytes(i)`, `describe()`.

    A source made by `open_source` holds the whole dataset. `slice(first, stop)` gives a source
    of images [first, stop) only, which keeps the dataset's image indices (`load(i)` for i in
    [first, stop)) and pickles with its own keys only: that is what a unit of work ships to a
    dask worker and its decoding processes, whatever the size of the dataset.
    """

    def __init__(
        self, cfg: DatasetConfig, keys: list[str], max_pixels: int, unusual_modes: str,
        *, first: int = 0, whole: bool = True,
    ) -> None:
        self.cfg = cfg
        # Variable-width numpy strings, not a tuple of str: no Python object per key, so a
        # forked DataLoader worker reading keys never writes a refcount into shared pages.
        # None in an unlisted source (HDF5Source.unlisted): keys are read from the file.
        self._keys: np.ndarray | None = np.array(keys, dtype=np.dtypes.StringDType())
        self._count = len(keys)
        self.first = first  # the dataset index of the first image held
        self.whole = whole  # False for a slice
        self.max_pixels = max_pixels
        self.unusual_modes = unusual_modes
        self.keys_sha256 = keys_sha256(keys)

    def keys(self) -> list[str]:
        """The image keys in source order (the sample order of the cache)."""
        if self._keys is None:
            return self._key_rows(self.first, self.stop)
        return self._keys.tolist()

    def key(self, i: int) -> str:
        """The key of image i (without copying the whole list)."""
        position = self._position(i)
        if self._keys is None:
            return self._key_rows(i, i + 1)[0]
        return str(self._keys[position])

    def _key_rows(self, first: int, stop: int) -> list[str]:
        """Keys of images [first, stop) read from the source itself (unlisted sources only)."""
        raise NotImplementedError(f"{type(self).__name__} always holds its keys")

    def __len__(self) -> int:
        return self._count

    @property
    def stop(self) -> int:
        """One past the dataset index of the last image held."""
        return self.first + self._count

    def _position(self, i: int) -> int:
        if not self.first <= i < self.stop:
            raise IndexError(f"{self.cfg.name}: image index {i} out of range "
                             f"[{self.first}, {self.stop})")
        return i - self.first

    def slice(self, first: int, stop: int) -> ImageSource:
        """The images [first, stop) as a source of their own (same class, same options)."""
        if not self.first <= first <= stop <= self.stop:
            raise IndexError(f"{self.cfg.name}: slice [{first}, {stop}) is not within "
                             f"[{self.first}, {self.stop})")
        keys = (self._key_rows(first, stop) if self._keys is None
                else self._keys[first - self.first : stop - self.first].tolist())
        return type(self)(self.cfg, keys, self.max_pixels, self.unusual_modes, first=first,
                          whole=False)

    def check_root(self) -> None:
        """Refuse a root that is not there (on a dask worker: the data is not mounted), rather
        than recording every image as unreadable."""
        is_there = url_files.is_file if self.cfg.kind == "hdf5" else url_files.is_dir
        if not is_there(self.cfg.root):
            raise ConfigError(
                f"dataset {self.cfg.name!r}: root {self.cfg.root!r} is not there on this machine "
                f"(host {socket.gethostname()})",
                hint="every dask worker must see the images at the same path as the driver",
            )

    def close(self) -> None:
        """Release this process's open handles (nothing for files); a later read reopens."""

    def location(self, i: int) -> str:
        """A human-readable place of image i, for messages."""
        raise NotImplementedError

    def read_bytes(self, i: int) -> bytes:
        """The encoded file of image i; an I/O failure is BadImageError(reason="unreadable")."""
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        """Image i as uint8 RGB [3, H, W]; a bad image raises BadImageError with its reason."""
        return self._decode(i, self.read_bytes(i))

    def load_fingerprinted(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i as `load` gives it, and the content fingerprint of the file's bytes it was
        decoded from (cache_format/source_fingerprint.py): one read of the file, a checksum
        pass over bytes already in memory."""
        data = self.read_bytes(i)
        return self._decode(i, data), fingerprint(data)

    def _decode(self, i: int, data: bytes) -> torch.Tensor:
        return decode_image(data, self.location(i), max_pixels=self.max_pixels,
                            unusual_modes=self.unusual_modes)

    def describe(self) -> dict[str, object]:
        """The dataset fingerprint (the fields of the manifest's DatasetFingerprint)."""
        if not self.whole:
            raise ValueError(f"{self!r} is a slice [{self.first}, {self.stop}): only a whole "
                             "source describes the dataset")
        return {
            "name": self.cfg.name,
            "source_kind": self.cfg.kind,
            "root": self.cfg.root,
            "num_images": len(self),
            "keys_sha256": self.keys_sha256,
            "domain": self.cfg.domain,
        }

    def __repr__(self) -> str:
        held = f"{len(self)} images" if self.whole else f"images [{self.first}, {self.stop})"
        return f"{type(self).__name__}({self.cfg.name!r}, {self.cfg.root!r}, {held})"


class FileSource(ImageSource):
    """Images stored as files under a root folder (the folder and list kinds)."""

    def location(self, i: int) -> str:
        return url_files.join(self.cfg.root, self.key(i))

    def read_bytes(self, i: int) -> bytes:
        path = self.location(i)
        try:
            return url_files.read_bytes(path)
        except OSError as exc:
            raise bad_image(
                path, "unreadable", f"cannot be read ({exc.strerror or exc}); check the file"
            ) from None


class HDF5Source(ImageSource):
    """Encoded images in the rows of one HDF5 dataset, opened lazily once per process."""

    def __init__(
        self, cfg: DatasetConfig, keys: list[str], max_pixels: int, unusual_modes: str,
        *, first: int = 0, whole: bool = True,
    ) -> None:
        super().__init__(cfg, keys, max_pixels, unusual_modes, first=first, whole=whole)
        self._file: Any = None
        self._rows: Any = None
        self._pid: int | None = None

    @classmethod
    def unlisted(cls, cfg: DatasetConfig, keys_hash: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 unusual_modes: str = "skip") -> HDF5Source:
        """The whole dataset without listing its keys into memory: the file's layout is checked
        and its rows counted, `keys_sha256` is `keys_hash` as given, and `key(i)` reads one row
        of the keys dataset. For stage two once this very file's key list was checked against
        the cache (train.source_checks): listing 20 M keys costs a minute and gigabytes."""
        _check_decoding(max_pixels, unusual_modes)
        where = f"dataset {cfg.name!r}: hdf5 file {cfg.root!r}"
        try:
            with url_files.open_hdf5(cfg.root) as f:
                count = dataset_keys.checked_rows(f, cfg, where).shape[0]
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be opened as HDF5 ({exc})") from None
        source = cls(cfg, [], max_pixels, unusual_modes)
        source._keys, source.keys_sha256 = None, keys_hash
        source._count = count if cfg.max_images is None else min(count, cfg.max_images)
        return source

    def _key_rows(self, first: int, stop: int) -> list[str]:
        rows = self._dataset()
        names = self._file.get(f"{self.cfg.hdf5_key}_keys")
        if names is None:
            return dataset_keys.row_number_keys(rows.shape[0], first, stop)
        return [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in names[first:stop]]

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state.update(_file=None, _rows=None, _pid=None)  # h5py handles do not travel
        return state

    def _dataset(self) -> Any:  # an h5py.Dataset (h5py is imported lazily)
        if self._rows is None or self._pid != os.getpid():
            # After a fork the parent's handle is unusable here: open our own.
            self._file = url_files.open_hdf5(self.cfg.root)
            self._rows = self._file[self.cfg.hdf5_key]
            self._pid = os.getpid()
        return self._rows

    def close(self) -> None:
        """Close this process's handle (it reopens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._rows = self._pid = None

    def location(self, i: int) -> str:
        return f"{self.cfg.root}:{self.cfg.hdf5_key}[{i}] (key {self.key(i)!r})"

    def read_bytes(self, i: int) -> bytes:
        self._position(i)  # IndexError outside the images held
        try:
            row = self._dataset()[i]
        except OSError as exc:
            raise bad_image(self.location(i), "unreadable", f"cannot be read ({exc})") from None
        return row if isinstance(row, bytes) else np.asarray(row).tobytes()


def _check_decoding(max_pixels: int, unusual_modes: str) -> None:
    check_choice(unusual_modes, UNUSUAL_MODES, "unusual_modes")
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ConfigError(f"max_pixels: expected a positive int, found {max_pixels!r}")
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is not None and max_pixels >= 2 * pil_limit:
        raise ConfigError(
            f"max_pixels: {max_pixels} is beyond Pillow's hard limit of {2 * pil_limit} pixels; "
            "set PIL.Image.MAX_IMAGE_PIXELS = None (or higher) before building to allow it"
        )


def open_source(
    cfg: DatasetConfig, max_pixels: int = DEFAULT_MAX_PIXELS, unusual_modes: str = "skip"
) -> ImageSource:
    """List a dataset's images (reads the folder / list / HDF5 keys once) and return its source."""
    _check_decoding(max_pixels, unusual_modes)
    where = f"dataset {cfg.name!r}: root {cfg.root!r}"
    if cfg.kind == "hdf5":
        if not url_files.is_file(cfg.root):
            raise ConfigError(f"{where}: expected an HDF5 file, found nothing there")
        keys, source_cls = dataset_keys.hdf5_keys(cfg), HDF5Source
    else:
        if not url_files.is_dir(cfg.root):
            raise ConfigError(f"{where}: expected an existing folder")
        keys = (dataset_keys.list_folder(cfg.root) if cfg.kind == "folder"
                else dataset_keys.read_list(cfg))
        source_cls = FileSource
    if not keys:
        raise ConfigError(
            f"{where}: no images found (kind {cfg.kind!r}; folder extensions "
            f"{', '.join(dataset_keys.IMAGE_EXTENSIONS)})"
        )
    if cfg.max_images is not None:
        keys = keys[: cfg.max_images]
    return source_cls(cfg, keys, max_pixels, unusual_modes)
