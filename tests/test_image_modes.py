"""32-bit integer greys (Pillow mode ``I``) become RGB by the range their values occupy, never clipped or darkened."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from videollama3_train.data.image import _to_rgb, load_image


def _i_image(values) -> Image.Image:
    img = Image.fromarray(np.asarray(values, dtype=np.int32))
    assert img.mode == "I"
    return img


def _grey(img: Image.Image) -> np.ndarray:
    a = np.asarray(img)
    assert img.mode == "RGB" and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0]


def test_8bit_range_is_kept_as_is() -> None:
    values = [[0, 1, 100], [128, 200, 255]]
    assert _grey(_to_rgb(_i_image(values), "x")).tolist() == values


def test_16bit_range_is_scaled_like_i16() -> None:
    values = np.array([[0, 256, 1000], [32768, 65000, 65535]])
    expected = (values * 255 + 32767) // 65535  # round(v * 255 / 65535), as for I;16
    assert _grey(_to_rgb(_i_image(values), "x")).tolist() == expected.tolist()
    # The same data stored as I;16 gives the same picture.
    i16 = Image.fromarray(values.astype(np.uint16))
    assert i16.mode.startswith("I;16")
    assert _grey(_to_rgb(i16, "x")).tolist() == expected.tolist()


@pytest.mark.parametrize(
    "values",
    [
        [[0, 70_000, 140_000], [35_000, 100, 1_000_000]],  # above 16 bits
        [[-500, 0, 500], [250, -250, 100]],  # negative
        [[-(2**31), 0, 2**31 - 1], [1, 2, 3]],  # the full int32 range
    ],
)
def test_large_or_signed_range_is_stretched_min_to_max(values) -> None:
    a = np.asarray(values, dtype=np.int64)
    grey = _grey(_to_rgb(_i_image(values), "x"))
    assert grey[a == a.min()].tolist() == [0] * int((a == a.min()).sum())
    assert grey[a == a.max()].tolist() == [255] * int((a == a.max()).sum())
    expected = np.round((a - a.min()) * 255 / (a.max() - a.min()))
    assert np.abs(grey.astype(int) - expected).max() <= 0.5 + 1e-9
    # monotone: the order of values survives
    order = np.argsort(a, axis=None, kind="stable")
    assert (np.diff(grey.ravel()[order].astype(int)) >= 0).all()


def test_constant_out_of_range_image_is_black() -> None:
    assert _grey(_to_rgb(_i_image([[100_000, 100_000]]), "x")).tolist() == [[0, 0]]


@pytest.mark.parametrize(
    "values, expected",
    [
        ([[0, 100], [200, 255]], [[0, 100], [200, 255]]),
        ([[0, 65535], [257, 1000]], [[0, 255], [1, 4]]),
        ([[0, 1_000_000], [500_000, 250_000]], [[0, 255], [128, 64]]),
    ],
)
def test_load_image_of_a_32bit_tiff(tmp_path: Path, values, expected) -> None:
    path = tmp_path / "i32.tif"
    _i_image(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"  # really a 32-bit integer file
    assert _grey(load_image(path)).tolist() == expected
