"""Views: pure sampling, valid boxes, exact replay, deterministic rendering."""

from __future__ import annotations

import colorsys
import dataclasses
import math
import threading
import typing

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as tvf
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_format.errors import CacheCorruptionError, CacheMismatchError, ConfigError
from cache_format.serde import from_dict, to_dict
from precompute.render import (
    _adjust_hue_,  # private, checked against torchvision
    normalize,
    render_view,
    resize_for_teacher,
)
from precompute.view_params import NUM_VIEW_PARAMS, VIEW_PARAM_NAMES, ViewParams, check_replay
from precompute.views import ViewConfig, derived_blur_kernel, sample_view

AUG = ViewConfig()
CENTER = ViewConfig(mode="center")

# The view of (seed 0, "imagenet", image 3, view 1) for a 480x640 image. This pins the RNG
# derivation and slot layout: if it changes, every existing cache replays different views.
GOLDEN = [480, 640, 30, 41, 435, 432, 0, 1,
          0.9432032108306885, 0.7941200137138367, 0.9133757948875427, -0.028271034359931946,
          2, 3, 0, 1, 1, 4.6954498291015625, 9, 0.5]  # fmt: skip


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _smooth_image(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    rgb = torch.stack([x.expand(h, w), y.expand(h, w), (x * y).expand(h, w)])
    return (rgb * 255).round().to(torch.uint8)


def test_sample_view_matches_golden_row() -> None:
    params = sample_view(0, "imagenet", 3, 1, (480, 640), AUG)
    np.testing.assert_array_equal(params.to_array(), np.asarray(GOLDEN, dtype=np.float32))


def test_sample_view_is_pure_and_depends_on_every_input() -> None:
    base = sample_view(7, "imagenet", 10, 2, (300, 400), AUG)
    assert sample_view(7, "imagenet", 10, 2, (300, 400), AUG) == base
    others = [
        sample_view(8, "imagenet", 10, 2, (300, 400), AUG),
        sample_view(7, "imagenet2", 10, 2, (300, 400), AUG),
        sample_view(7, "imagenet", 11, 2, (300, 400), AUG),
        sample_view(7, "imagenet", 10, 3, (300, 400), AUG),
    ]
    assert all(o != base for o in others)
    assert len({o.to_array().tobytes() for o in others}) == len(others)


def test_decisions_read_independent_slots() -> None:
    # Turning one augmentation off must not move the others (each reads its own slot).
    for i in range(20):
        full = sample_view(1, "d", i, 0, (200, 300), AUG)
        no_flip = sample_view(1, "d", i, 0, (200, 300), ViewConfig(flip_p=0.0, jitter_p=0.0))
        assert no_flip.crop_top == full.crop_top and no_flip.crop_h == full.crop_h
        assert (no_flip.grayscale, no_flip.blur_sigma) == (full.grayscale, full.blur_sigma)
        assert not no_flip.flip and not no_flip.jitter


def test_augmentation_frequencies_follow_the_config() -> None:
    views = [sample_view(3, "freq", i, v, (256, 320), AUG) for i in range(500) for v in range(4)]
    n = len(views)
    assert abs(sum(p.flip for p in views) / n - 0.5) < 0.04
    assert abs(sum(p.jitter for p in views) / n - 0.8) < 0.04
    assert abs(sum(p.grayscale for p in views) / n - 0.2) < 0.04
    assert abs(sum(p.blur_kernel > 0 for p in views) / n - 0.2) < 0.04
    assert abs(sum(p.solarize_threshold > 0 for p in views) / n - 0.2) < 0.04
    # Every jitter order occurs (24 permutations), factors span their ranges.
    assert len({p.jitter_order for p in views if p.jitter}) == 24
    brightness = [p.brightness for p in views if p.jitter]
    assert min(brightness) < 0.65 and max(brightness) > 1.35


def _consistent_with_range(
    p: ViewParams, scale: tuple[float, float], ratio: tuple[float, float]
) -> bool:
    """Could the rounded box come from some (scale, ratio) in the ranges? (+-0.5 px rounding)"""
    area = p.src_h * p.src_w
    w_lo, w_hi, h_lo, h_hi = p.crop_w - 0.5, p.crop_w + 0.5, p.crop_h - 0.5, p.crop_h + 0.5
    eps = 1e-9
    return (
        w_lo * h_lo / area <= scale[1] + eps
        and w_hi * h_hi / area >= scale[0] - eps
        and w_lo / h_hi <= ratio[1] + eps
        and w_hi / h_lo >= ratio[0] - eps
    )


def _fallback_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    if w / h < ratio[0]:
        ch, cw = min(h, round(w / ratio[0])), w
    elif w / h > ratio[1]:
        ch, cw = h, min(w, round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 5000),
    w=st.integers(1, 5000),
    image_index=st.integers(0, 2**40),
    view_index=st.integers(0, 63),
    scale_lo=st.floats(0.05, 1.0),
    ratio_lo=st.floats(0.2, 1.0),
    ratio_hi=st.floats(1.0, 5.0),
)
def test_crop_box_inside_image_and_in_range(
    h: int, w: int, image_index: int, view_index: int, scale_lo: float, ratio_lo: float,
    ratio_hi: float,
) -> None:  # fmt: skip
    cfg = ViewConfig(scale=(scale_lo, 1.0), ratio=(ratio_lo, ratio_hi))
    p = sample_view(5, "hyp", image_index, view_index, (h, w), cfg)
    assert (p.src_h, p.src_w) == (h, w)
    assert p.crop_h >= 1 and p.crop_w >= 1
    assert 0 <= p.crop_top <= h - p.crop_h and 0 <= p.crop_left <= w - p.crop_w
    box = (p.crop_top, p.crop_left, p.crop_h, p.crop_w)
    assert _consistent_with_range(p, cfg.scale, cfg.ratio) or box == _fallback_box(h, w, cfg.ratio)
    # Photometric parameters stay in their ranges, and the row survives float32 exactly.
    b, c, s, hue = cfg.jitter
    assert 1 - b - 1e-6 <= p.brightness <= 1 + b + 1e-6 and abs(p.hue) <= hue + 1e-6
    assert 1 - c - 1e-6 <= p.contrast <= 1 + c + 1e-6
    assert 1 - s - 1e-6 <= p.saturation <= 1 + s + 1e-6
    assert sorted(p.jitter_order) == [0, 1, 2, 3]
    assert p.blur_sigma == 0 or 0.1 - 1e-6 <= p.blur_sigma <= 5.0 + 1e-6
    assert ViewParams.from_array(p.to_array()) == p


def test_large_images_give_tight_scale_and_ratio() -> None:
    for i in range(200):
        p = sample_view(0, "big", i, 0, (3000, 4000), AUG)
        frac = p.crop_h * p.crop_w / (3000 * 4000)
        assert 0.4 - 1e-3 <= frac <= 1.0 + 1e-3
        assert 3 / 4 - 1e-2 <= p.crop_w / p.crop_h <= 4 / 3 + 1e-2


def test_center_mode_is_the_largest_centred_square_without_changes() -> None:
    p = sample_view(0, "c", 0, 0, (300, 500), CENTER)
    assert (p.crop_top, p.crop_left, p.crop_h, p.crop_w) == (0, 100, 300, 300)
    assert p == sample_view(99, "other", 5, 3, (300, 500), CENTER)
    assert not (p.flip or p.jitter or p.grayscale)
    assert p.blur_sigma == 0 and p.blur_kernel == 0 and p.solarize_threshold == 0
    image = _image(300, 500)
    out = render_view(image, p, (56, 56))
    # Exactly the reference's eval path: crop, uint8 bicubic antialiased resize, to [0, 1].
    plain = torch.nn.functional.interpolate(
        image[None, :, :, 100:400], size=(56, 56), mode="bicubic", antialias=True,
        align_corners=False,
    )[0].float() / 255  # fmt: skip
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_render_view_is_deterministic_with_range_and_shape() -> None:
    image = _image(180, 240, seed=1)
    for i in range(12):
        p = sample_view(2, "render", i, 0, (180, 240), AUG)
        out = render_view(image, p, (56, 42))
        assert out.dtype == torch.float32 and out.shape == (3, 56, 42)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.equal(out, render_view(image, p, (56, 42)))


def test_render_view_does_not_depend_on_thread_count() -> None:
    image = _image(300, 400, seed=2)
    p = ViewParams(300, 400, 10, 20, 250, 300, flip=True, jitter=True, brightness=1.2,
                   contrast=0.7, saturation=1.1, hue=0.05, jitter_order=(3, 1, 0, 2),
                   blur_sigma=2.5, blur_kernel=9, solarize_threshold=0.5)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = render_view(image, p, (224, 224))
        torch.set_num_threads(3)
        three = render_view(image, p, (224, 224))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)


def _hue_float64(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The HSV hue rotation in double precision, pixel by pixel (Python's colorsys, with the
    same tie order): the definition that torchvision and our float32 rotation approximate."""
    pixels = x.double().reshape(3, -1).T.tolist()
    out = []
    for r, g, b in pixels:
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        out.append(colorsys.hsv_to_rgb((h + factor) % 1.0, s, v))
    return torch.tensor(out, dtype=torch.float64).T.reshape(x.shape)


def test_hue_rotation_matches_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, 50, generator=g)
    ties = torch.randint(0, 4, (3, 20, 20), generator=g) / 3.0  # grays and tied maxima
    for factor in (-0.5, -0.23, 0.0, 0.1, 0.37, 0.5):
        for img in (x, ties):
            expected = tvf.adjust_hue(img, factor)
            out = _adjust_hue_(img.clone(), factor)
            torch.testing.assert_close(out, expected, atol=5e-6, rtol=0)
            # At least as close to the exact definition as torchvision's own float32 result.
            exact = _hue_float64(img, factor)
            assert (out.double() - exact).abs().max() <= max(
                float((expected.double() - exact).abs().max()), 1e-6)


def test_hue_rotation_is_in_place_and_independent_of_earlier_calls() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 30, 20, generator=g), torch.rand(3, 12, 16, generator=g)
    first = _adjust_hue_(a.clone(), 0.3)
    x = a.clone()
    assert _adjust_hue_(x, 0.3).data_ptr() == x.data_ptr()  # the result overwrites x
    _adjust_hue_(b.clone(), -0.2)  # other scratch planes (another size) in between
    assert torch.equal(_adjust_hue_(a.clone(), 0.3), first)
    results: list[torch.Tensor] = []  # and in another thread (its own planes)
    thread = threading.Thread(target=lambda: results.append(_adjust_hue_(a.clone(), 0.3)))
    thread.start()
    thread.join()
    assert torch.equal(results[0], first)
    # A non-contiguous input is rotated in a contiguous copy.
    wide = torch.rand(3, 30, 40, generator=g)[:, :, ::2]
    torch.testing.assert_close(_adjust_hue_(wide, 0.1), tvf.adjust_hue(wide, 0.1), atol=5e-6,
                               rtol=0)


def test_render_operations_do_what_the_params_say() -> None:
    image = _image(64, 80, seed=3)

    def render(**changes: object) -> torch.Tensor:
        return render_view(image, ViewParams(64, 80, 4, 6, 50, 60, **changes), (32, 32))

    plain = render()
    assert torch.equal(render(flip=True), plain.flip(-1))
    gray = render(grayscale=True)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    solar = render(solarize_threshold=0.5)
    torch.testing.assert_close(solar, torch.where(plain >= 0.5, 1 - plain, plain), rtol=0, atol=0)
    blurred = render(blur_sigma=2.0, blur_kernel=9)
    assert blurred.var() < plain.var() * 0.5
    torch.testing.assert_close(blurred.mean(), plain.mean(), atol=0.01, rtol=0)
    bright = render(jitter=True, brightness=0.5)
    torch.testing.assert_close(bright, plain * 0.5, atol=1e-6, rtol=0)
    # Jitter factors are ignored unless the jitter flag is set.
    assert torch.equal(render(brightness=0.5, hue=0.2), plain)


def test_jitter_order_matters() -> None:
    image = _smooth_image(64, 64)
    kwargs = dict(jitter=True, brightness=1.4, contrast=0.6, saturation=1.2, hue=0.1)
    a = render_view(image, ViewParams(64, 64, 0, 0, 64, 64, jitter_order=(0, 1, 2, 3), **kwargs),
                    (32, 32))  # fmt: skip
    b = render_view(image, ViewParams(64, 64, 0, 0, 64, 64, jitter_order=(3, 2, 1, 0), **kwargs),
                    (32, 32))  # fmt: skip
    assert not torch.equal(a, b)


def test_blur_on_a_constant_image_keeps_it_constant_and_tiny_outputs_work() -> None:
    image = torch.full((3, 20, 20), 128, dtype=torch.uint8)
    p = ViewParams(20, 20, 0, 0, 20, 20, blur_sigma=4.0, blur_kernel=derived_blur_kernel(4.0))
    out = render_view(image, p, (3, 3))  # kernel 25 narrowed to fit a 3x3 output
    torch.testing.assert_close(out, torch.full_like(out, 128 / 255), atol=1e-6, rtol=0)
    assert derived_blur_kernel(0.1) == 3 and derived_blur_kernel(2.0) == 13


def test_render_view_refuses_an_image_of_another_size() -> None:
    p = sample_view(0, "d", 0, 0, (100, 120), AUG)
    with pytest.raises(CacheMismatchError, match="100x120"):
        render_view(_image(100, 121), p, (28, 28))
    with pytest.raises(ValueError, match="uint8"):
        render_view(_image(100, 120).float(), p, (28, 28))


def test_to_array_from_array_round_trip_and_damaged_rows() -> None:
    assert len(VIEW_PARAM_NAMES) == NUM_VIEW_PARAMS == 20
    for i in range(50):
        p = sample_view(4, "rt", i, i % 4, (97, 131), AUG)
        row = p.to_array()
        assert row.dtype == np.float32 and row.shape == (NUM_VIEW_PARAMS,)
        assert ViewParams.from_array(row) == p
    row = sample_view(4, "rt", 0, 0, (97, 131), AUG).to_array()
    repeated = float(row[VIEW_PARAM_NAMES.index("jitter_order_1")])
    damage = [("flip", 0.5), ("crop_h", 500.0), ("jitter_order_0", repeated),
              ("blur_kernel", 2.5), ("blur_sigma", 1.0), ("hue", float("nan"))]  # fmt: skip
    for column, value in damage:
        bad = row.copy()
        bad[VIEW_PARAM_NAMES.index(column)] = value
        with pytest.raises(CacheCorruptionError, match="not a valid view"):
            ViewParams.from_array(bad)
    with pytest.raises(CacheCorruptionError, match="expected 20 values"):
        ViewParams.from_array(row[:-1])


def test_from_array_reads_real_types_not_annotation_strings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without `from __future__ import annotations`, `field.type` holds real types, not strings:
    stored rows must still read back (they used to be compared against "float" and "bool")."""
    hints = typing.get_type_hints(ViewParams)
    for f in dataclasses.fields(ViewParams):
        monkeypatch.setattr(f, "type", hints[f.name])
    for i in range(20):
        p = sample_view(5, "types", i, 0, (61, 83), AUG)
        assert ViewParams.from_array(p.to_array()) == p
    bad = p.to_array()
    bad[VIEW_PARAM_NAMES.index("grayscale")] = 2.0
    with pytest.raises(CacheCorruptionError, match="flag grayscale is 2.0"):
        ViewParams.from_array(bad)


@pytest.mark.parametrize(
    "column", ["crop_left", "flip", "brightness", "jitter_order_2", "blur_sigma"]
)
def test_check_replay_names_the_changed_column(column: str) -> None:
    p = sample_view(0, "imagenet", 3, 1, (480, 640), AUG)
    stored = p.to_array()
    check_replay(stored, p)  # identical: no error
    changed = stored.copy()
    changed[VIEW_PARAM_NAMES.index(column)] += 1
    with pytest.raises(CacheMismatchError, match=rf"imagenet\[3\]: .*\b{column} \(stored"):
        check_replay(changed, p, where="imagenet[3]")


def test_check_replay_refuses_a_row_of_another_width() -> None:
    p = sample_view(0, "x", 0, 0, (10, 10), AUG)
    with pytest.raises(CacheMismatchError, match="shape"):
        check_replay(np.zeros(7, dtype=np.float32), p)


def test_resize_for_teacher_matches_the_token_grid() -> None:
    x = torch.rand(2, 3, 56, 56)  # a 4x4 grid of 14 px patches
    y = resize_for_teacher(x, (64, 64))  # a 4x4 grid of 16 px patches
    assert y.shape == (2, 3, 64, 64) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert resize_for_teacher(x, (56, 56)) is x
    with pytest.raises(ValueError, match="B, 3"):
        resize_for_teacher(x[0], (64, 64))


def test_normalize_per_channel() -> None:
    x = torch.rand(2, 3, 4, 5)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    y = normalize(x, mean, std)
    for c in range(3):
        torch.testing.assert_close(y[:, c], (x[:, c] - mean[c]) / std[c])
    torch.testing.assert_close(normalize(x[0], mean, std), y[0])
    with pytest.raises(ValueError):
        normalize(x, mean, (0.2, 0.0, 0.2))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "random"),
        ("scale", (0.0, 1.0)),
        ("scale", (0.5, 1.5)),
        ("scale", (0.8, 0.4)),
        ("ratio", (2.0, 1.0)),
        ("flip_p", 1.5),
        ("jitter", (0.4, 0.4, 0.2)),
        ("jitter", (0.4, -0.1, 0.2, 0.1)),
        ("jitter", (0.4, 0.4, 0.2, 0.6)),
        ("blur_sigma", (0.0, 2.0)),
        ("blur_kernel_size", 4),
        ("solarize_threshold", 0.0),
    ],
)
def test_view_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"ViewConfig\.{field}"):
        ViewConfig(**{field: value})


def test_view_config_round_trips_through_serde() -> None:
    cfg = ViewConfig(scale=(0.3, 0.9), blur_kernel_size=0, solarize_p=0.0)
    data = to_dict(cfg)
    assert from_dict(ViewConfig, data) == cfg
    assert math.isclose(data["ratio"][1], 4 / 3)


def test_sample_view_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        sample_view(-1, "d", 0, 0, (10, 10), AUG)
    with pytest.raises(ValueError):
        sample_view(0, "d", 0, 0, (0, 10), AUG)
