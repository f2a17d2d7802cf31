"""Fidelity of every token encoding, and of the candidates that lost, on real pretrained
activations and on ViT-like synthetic ones; writes the section `bench_fidelity` of
docs/benchmarks.md.

Real activations: the residual stream after the second transformer block (SVTR "global mixing"
block: attention + MLP, D = 120, 40 tokens per text line) of the PP-OCRv4 recognition model that
the PyPI package rapidocr_onnxruntime 1.4.4 ships inside its wheel, run with onnxruntime on text
lines rendered with PIL. It is the only pretrained transformer we found whose weights come inside
a registry package; it is small and its channels are milder than a ViT-L's (max/median channel
std about 2), so the synthetic set (D = 1024, four channels 50-200x the median, as
cache_format.testing makes them) stands in for a ViT-L's outlier channels.

Per encoding: bytes per sample of a ViT-L/14 teacher at 448 px (1024 patch tokens + cls,
D = 1024; the shipped encodings through footprint.bytes_per_sample, the candidates by their
formula), then token cosine against the float32 tokens (mean and 1st percentile), raw and after
standardizing each channel with the data's own statistics (what the trainer's TeacherNorm feeds
the loss), and the 1st percentile again with one channel made constant across the calibration
tokens (the failure mode of issue 12).

Needs the benchmark extra: `pip install -e '.[fidelity]'` then
`pip install --no-deps rapidocr_onnxruntime==1.4.4` (only its ONNX file is used; --no-deps
skips its OpenCV dependency). Run: `.venv/bin/python tests/benchmarks/bench_fidelity.py
[--quick]`.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _report import machine_description, markdown_table, write_section

from cache_format import int4
from cache_format.encodings import EncodingSpec, decode_tokens, encode_tokens, fit_calibration
from cache_format.footprint import bytes_per_sample
from cache_format.testing import synthetic_activations

#: The residual stream after the second SVTR block of PP-OCRv4's recognizer.
BLOCK_OUTPUT = "p2o.Add.271"
VIT_L = (1024, 1024)  # patch tokens and width of a ViT-L/14 at 448 px
CONSTANT_CHANNEL = 5
Codec = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def real_activations(lines: int) -> np.ndarray:
    """float32 [lines, 40, 120] block outputs of PP-OCRv4's recognizer on rendered text lines."""
    import onnx
    import onnxruntime
    from PIL import Image, ImageDraw

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_fidelity needs rapidocr_onnxruntime's model: pip install "
                         "--no-deps rapidocr_onnxruntime==1.4.4 (see the module docstring)")
    model = onnx.load(str(Path(spec.origin).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(BLOCK_OUTPUT))
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789 ABCDEFGHIJ")
    images = []
    for _ in range(lines):
        image = Image.new("RGB", (320, 48), tuple(int(v) for v in rng.integers(180, 256, 3)))
        text = "".join(rng.choice(letters, int(rng.integers(5, 30))))
        ImageDraw.Draw(image).text((int(rng.integers(0, 20)), int(rng.integers(4, 16))), text,
                                   fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                                   font_size=int(rng.integers(18, 30)))
        images.append((np.asarray(image, np.float32) / 255 - 0.5) / 0.5)
    batch = np.stack(images).transpose(0, 3, 1, 2)
    outs = [session.run([BLOCK_OUTPUT], {"x": batch[i : i + 16]})[0]
            for i in range(0, lines, 16)]
    return np.concatenate(outs).astype(np.float32)


# -- the candidates that lost (numpy, as measured; not in the format) ---------------------------
def _per_token(y: np.ndarray, levels: int) -> np.ndarray:
    """Round y to `levels` steps of its per-token absmax (float32 scale), and back."""
    s = np.abs(y).max(-1, keepdims=True) / levels
    s = np.where(s > 0, s, 1)
    return np.clip(np.rint(y / s), -levels, levels) * s


def _grouped(y: np.ndarray, group: int) -> np.ndarray:
    """int4 with a float16 scale per `group` channels, and back."""
    d = y.shape[-1]
    n = -(-d // group)
    yp = np.zeros((*y.shape[:-1], n * group), np.float32)
    yp[..., :d] = y
    yp = yp.reshape(*y.shape[:-1], n, group)
    s = (np.abs(yp).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    s = np.where(s > 0, s, 1)
    return (np.clip(np.rint(yp / s), -7, 7) * s).reshape(*y.shape[:-1], -1)[..., :d]


def _full_hadamard(y: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard over D zero-padded to a power of two (PHI-S needs all of D)."""
    d = y.shape[-1]
    width = 1 << (d - 1).bit_length()
    padded = np.zeros((*y.shape[:-1], width), np.float32)
    padded[..., :d] = y
    return int4.hadamard(padded)


def _pca(calib: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors [D, D] of the calibration covariance."""
    flat = calib.reshape(-1, calib.shape[-1]).astype(np.float64)
    lam, vec = np.linalg.eigh(np.cov(flat.T))
    return lam[::-1].clip(1e-12), vec[:, ::-1]


def plain_int8(x: np.ndarray, calib: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return _per_token(x, 127)


def int4_per_token(x: np.ndarray, calib: np.ndarray, mean: np.ndarray,
                   std: np.ndarray) -> np.ndarray:
    return _per_token((x - mean) / std, 7) * std + mean


def int4_group32(x: np.ndarray, calib: np.ndarray, mean: np.ndarray,
                 std: np.ndarray) -> np.ndarray:
    return _grouped((x - mean) / std, 32) * std + mean


def centered_hadamard(x: np.ndarray, calib: np.ndarray, mean: np.ndarray,
                      std: np.ndarray) -> np.ndarray:
    d = x.shape[-1]
    return _full_hadamard(_grouped(_full_hadamard(x - mean), 128))[..., :d] + mean


def pca_k(fraction: int) -> Codec:
    def codec(x: np.ndarray, calib: np.ndarray, mean: np.ndarray,
              std: np.ndarray) -> np.ndarray:
        _, vec = _pca(calib)
        basis = vec[:, : x.shape[-1] // fraction]
        coeff = ((x - mean) @ basis).astype(np.float16).astype(np.float64)
        return (coeff @ basis.T + mean).astype(np.float32)
    return codec


def phi_s(x: np.ndarray, calib: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """PCA rotation, Hadamard, one scalar (every rotated channel then has unit variance), int4
    with a per-token scale, and back."""
    d = x.shape[-1]
    lam, vec = _pca(calib)
    alpha = np.float32(np.sqrt(lam.mean()))
    w = _full_hadamard(((x - mean) @ vec).astype(np.float32)) / alpha
    back = _full_hadamard(_per_token(w, 7) * alpha)[..., :d]
    return (back @ vec.T + mean).astype(np.float32)


def shipped(name: str) -> Codec:
    spec = EncodingSpec(name)

    def codec(x: np.ndarray, calib: np.ndarray, mean: np.ndarray,
              std: np.ndarray) -> np.ndarray:
        return decode_tokens(*encode_tokens(x, spec, mean, std), spec, mean, std)
    return codec


def _bytes(per_token: int) -> int:
    """Stored bytes of a ViT-L/14 448 px sample for a candidate of `per_token` bytes a token."""
    return (VIT_L[0] + 1) * per_token + 4


CANDIDATES: list[tuple[str, Codec, int]] = [
    *[(f"{n} (shipped)", shipped(n), bytes_per_sample(EncodingSpec(n), *VIT_L))
      for n in ("fp16", "bf16", "int8", "int4", "int4h")],
    ("int8, plain per-token absmax (no standardization)", plain_int8, _bytes(1024 + 4)),
    ("int4 standardized, one f32 scale per token", int4_per_token, _bytes(512 + 4)),
    ("int4 standardized, f16 scale per 32 channels", int4_group32, _bytes(512 + 64)),
    ("int4 centered + Hadamard (no std), f16 scale per 128", centered_hadamard, _bytes(512 + 16)),
    ("PCA-k, k = D/4, fp16 coefficients", pca_k(4), _bytes(512)),
    ("PCA-k, k = D/2, fp16 coefficients", pca_k(2), _bytes(1024)),
    ("PHI-S (PCA, Hadamard, scalar), int4 per token", phi_s, _bytes(512 + 4)),
]


def cosines(decoded: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token cosine, raw and with each channel standardized by x's own statistics."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    dec = decoded.reshape(flat.shape).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1)
                                            * np.linalg.norm(b, axis=-1), 1e-30)
    return cos(dec, flat), cos((dec - mean) / std, (flat - mean) / std)


def measure(x: np.ndarray, calib: np.ndarray) -> list[list[str]]:
    """A table row per candidate: bytes, raw and standardized cosines, and both 1st percentiles
    with CONSTANT_CHANNEL constant across the calibration tokens."""
    broken = calib.copy()
    broken[..., CONSTANT_CHANNEL] = broken[..., CONSTANT_CHANNEL].mean()
    rows = []
    for label, codec, nbytes in CANDIDATES:
        raw, std_cos = cosines(codec(x, calib, *fit_calibration(calib)), x)
        raw_b, std_b = cosines(codec(x, broken, *fit_calibration(broken)), x)
        rows.append([label, f"{nbytes / 1e6:.3f}", f"{raw.mean():.5f}",
                     f"{np.percentile(raw, 1):.5f}", f"{std_cos.mean():.5f}",
                     f"{np.percentile(std_cos, 1):.5f}", f"{np.percentile(raw_b, 1):.5f}",
                     f"{np.percentile(std_b, 1):.5f}"])
    return rows


HEADER = ["encoding", "MB / ViT-L sample", "cos mean", "cos p1", "std. cos mean", "std. cos p1",
          "p1, const. channel", "std. p1, const. channel"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens, no docs section")
    args = parser.parse_args()
    lines = 64 if args.quick else 512
    real = real_activations(lines)
    calib_lines = lines // 8  # the build's calibration is the first samples of a pair
    rng = np.random.default_rng(0)
    synthetic = synthetic_activations(rng, (16 if args.quick else 96, 64, 1024))
    tables = []
    for title, x, calib in (
        (f"Real: PP-OCRv4 recognizer, block 2 output, {lines - calib_lines} text lines x 40 "
         f"tokens, D = 120, calibrated on {calib_lines} lines", real[calib_lines:],
         real[:calib_lines]),
        (f"Synthetic ViT-like: D = 1024, 4 outlier channels 50-200x, "
         f"{(synthetic.shape[0] * 2 // 3) * 64} tokens, calibrated on "
         f"{synthetic.shape[0] // 3 * 64}", synthetic[synthetic.shape[0] // 3 :],
         synthetic[: synthetic.shape[0] // 3]),
    ):
        table = markdown_table(HEADER, measure(x, calib))
        print(title)
        print(table)
        tables.append(f"{title}:\n\n{table}")
    machine = machine_description()
    print(machine)
    if not args.quick:
        write_section("bench_fidelity", "\n".join([
            "## Encoding fidelity (bench_fidelity.py)", "",
            f"Machine: {machine}.", "",
            "Token cosine against float32 tokens; 'std.' after standardizing each channel "
            "with the data's statistics (what the trainer's loss sees); 'const. channel': "
            f"channel {CONSTANT_CHANNEL} made constant across the calibration tokens. MB per "
            "sample of a ViT-L/14 teacher at 448 px (1024 patch tokens + cls, D = 1024). "
            "Which encodings shipped and why: docs/encodings.md.", "",
            "\n\n".join(tables)]))


if __name__ == "__main__":
    main()
