"""A version-2 cache is readable by two independent zarr v3 implementations, zarr-python and
tensorstore's zarr3 driver, and both read exactly what CacheReader returns: token records, keys
(bytes + offsets), statuses (consolidated and per row) and view parameters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from cache_format.encodings import EncodingSpec
from cache_format.reader import open_cache
from cache_format.testing import build_tiny_cache, tiny_teacher

ts = pytest.importorskip("tensorstore", reason="tensorstore is in the [dev] extra")


def _zarr_python(path: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_array(str(path / name), mode="r")[...])


def _tensorstore(path: Path, name: str) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


@pytest.mark.parametrize("read", [_zarr_python, _tensorstore], ids=["zarr", "tensorstore"])
def test_both_implementations_read_what_the_reader_returns(tmp_path: Path, read: object) -> None:
    path = tmp_path / "c"
    build_tiny_cache(path, EncodingSpec("int8"), teachers=[
        tiny_teacher(), tiny_teacher("t2", dim=8, token_types=("patch",))],
        datasets=[("ds", 7), ("other", 3)], invalid=(1, 6))
    get = read  # type: ignore[assignment]
    with open_cache(path) as reader:
        for dataset in reader.datasets:
            base = path / "datasets" / dataset
            index = reader.index(dataset)
            text = get(base, "key_utf8").tobytes()  # type: ignore[operator]
            offsets = get(base, "key_offsets").tolist()  # type: ignore[operator]
            keys = [text[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:],
                                                               strict=True)]
            assert keys == [str(k) for k in index.keys]
            rows = get(base, "index_rows")  # type: ignore[operator]
            np.testing.assert_array_equal(get(base, "statuses"), index.status)  # type: ignore[operator]
            np.testing.assert_array_equal(rows[:, -1], index.status)
            params = np.ascontiguousarray(rows[:, :-1]).view("<f4")
            np.testing.assert_array_equal(params, index.view_params)
            samples = np.arange(index.num_samples)
            for teacher in reader.teachers_for(dataset):
                records = get(base / "teachers" / teacher, "tokens")  # type: ignore[operator]
                ours = reader.read_encoded(dataset, samples, [teacher])[teacher]
                fields = {f.name: f for f in reader._records(dataset, teacher)[1]}
                for tok, enc in ours.items():
                    f = fields[tok]
                    stored = records[:, f.offset : f.offset + f.nbytes].copy().view(f.dtype)
                    np.testing.assert_array_equal(stored.reshape(enc.values.shape),
                                                  enc.values.numpy())
                summary = get(base / "teachers" / teacher, "summary")  # type: ignore[operator]
                assert summary[0] == 1 and summary[1] == int(index.ok.sum())
