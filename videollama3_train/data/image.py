"""Reading images (and resolving media paths), with every failure a named ``DataError``.

Images go through Pillow: header-only probing (size after EXIF orientation), a decompression-bomb guard checked
before any pixel is decoded, and one well-defined conversion of every mode to 8-bit RGB.
"""

from __future__ import annotations

import functools
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from videollama3_train.data.errors import DataError

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's hard DecompressionBomb limit (2 x MAX_IMAGE_PIXELS)


# ---------------------------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------------------------
def resolve_media_path(root: PathLike, rel: str, follow_symlinks: bool = True) -> Path:
    """Join ``rel`` to ``root``, check the path stays inside ``root`` and holds data; return it resolved.

    Containment is checked on the path as written (lexically): ``..`` that climbs out of ``root``, or an absolute
    path elsewhere, is ``path_escapes_root``. ``..`` is collapsed before any link is followed, so the file checked
    is the file opened. With ``follow_symlinks`` (``data.follow_symlinks``, the default) a symlink that exists
    inside ``root`` is then followed wherever it points: links inside a media root are the dataset owner's (a
    cluster's shared dataset folder linked into ``data/``). ``follow_symlinks=False`` also refuses a path whose
    links resolve outside ``root`` (the strict check). An absolute ``rel`` is accepted only when it lies inside
    ``root`` (as written or resolved). A directory is returned as is (a frame folder); emptiness of a folder is
    checked when it is probed.
    Raises DataError ``path_escapes_root``, ``missing_file`` or ``empty_file`` (0-byte file).
    """
    root = os.fspath(root)
    root_abs, root_resolved = _root_forms(root, "" if os.path.isabs(root) else os.getcwd())
    joined = os.path.normpath(os.path.join(root_abs, rel))  # an absolute rel replaces root_abs here

    def inside(path: str | Path, top: str | Path) -> bool:
        path, top = str(path), str(top)
        return path == top or path.startswith(top.rstrip(os.sep) + os.sep)

    if not (inside(joined, root_abs) or inside(joined, root_resolved)):
        raise DataError(
            "path_escapes_root",
            f"{rel!r} lies outside the data root {root_abs}",
            path=rel,
        )
    found = _open_resolved(joined)
    target = Path(found[0]) if found is not None else Path(joined).resolve()
    if not follow_symlinks and not inside(target, root_resolved):
        raise DataError(
            "path_escapes_root",
            f"{rel!r} resolves through a symlink to {target}, outside the data root {root_resolved} "
            "(data.follow_symlinks=false)",
            path=rel,
        )
    try:
        st = found[1] if found is not None else target.stat()
    except FileNotFoundError:
        raise DataError("missing_file", f"no such file under {root_abs}", path=str(target)) from None
    if not stat.S_ISDIR(st.st_mode) and st.st_size == 0:
        raise DataError("empty_file", "file is 0 bytes", path=str(target))
    return target


@functools.lru_cache(maxsize=64)
def _root_forms(root: str, cwd: str) -> tuple[str, Path]:
    """A media root as written (absolute, normalised) and resolved: once per root (and working directory, for a
    relative one) and process, not per record (resolving it was 26 us of a 170 us image cost)."""
    return os.path.normpath(os.path.abspath(root)), Path(root).resolve()


_PROC_FD = "/proc/self/fd/"
_O_PATH = getattr(
    os, "O_PATH", None
)  # Linux: a handle that reads nothing, never blocks (a FIFO) nor needs read access


def _open_resolved(path: str) -> tuple[str, os.stat_result] | None:
    """``(os.path.realpath(path), os.stat(path))`` in three system calls: the kernel resolves the path once when it
    opens it (``O_PATH``) and ``/proc/self/fd`` names what it opened (7 us against realpath's 19 us and a stat:
    realpath ``lstat``s every component, links followed included). None where that cannot be done (no
    ``O_PATH`` or ``/proc``, a path that does not open): the caller resolves it the portable way."""
    if _O_PATH is None:
        return None
    try:
        fd = os.open(path, _O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        resolved = os.readlink(_PROC_FD + str(fd))
        st = os.fstat(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not resolved.startswith("/") or resolved.endswith(" (deleted)"):
        return None
    return resolved, st


def check_file(path: PathLike) -> str:
    """Existence / emptiness check shared by the readers; returns the path as str."""
    return stat_file(path)[0]


def stat_file(path: PathLike) -> tuple[str, bool]:
    """:func:`check_file`, and whether the path is a directory (one ``stat``)."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise DataError("missing_file", "no such file", path=p) from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and st.st_size == 0:
        raise DataError("empty_file", "file is 0 bytes", path=p)
    return p, is_dir


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------
# EXIF orientation -> the transpose that makes the image upright (same table as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow's errors for unreadable / broken image data (UnidentifiedImageError is an OSError).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _open_image(path: str, max_pixels: int, is_dir: bool | None = None) -> Image.Image:
    """Open lazily (header only) and apply the pixel guard before anything is decoded. ``is_dir``: whether the
    path is a directory, when the caller has stat'ed it already."""
    if os.path.isdir(path) if is_dir is None else is_dir:
        raise DataError(
            "unsupported_image_folder",
            "an image path names a folder. The official code reads a folder under 'image' as one image per file "
            "(one <image> tag each); not supported here: list its files under 'image', or give the folder "
            "under 'video' to read it as one video (frame folder)",
            path=path,
        )
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides; Pillow's warning above 89 MP would only add noise in data workers.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise DataError("image_too_large", str(e), path=path) from None
    except _PIL_DECODE_ERRORS as e:
        raise DataError("corrupt_image", f"cannot read image header: {e}", path=path) from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise DataError("image_too_large", f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}", path=path)
    if w < 1 or h < 1:
        img.close()
        raise DataError("corrupt_image", f"image has size {w}x{h}", path=path)
    return img


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1-8) from header data only.

    ``Image.getexif()`` on a PNG decodes the whole file to look for a trailing eXIf chunk, so for PNG only an eXIf
    chunk seen before the pixel data counts; probe and load use this same function, so their sizes always agree.
    """
    if img.format == "PNG":
        raw = img.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = img.getexif()
    value = exif.get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def probe_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as displayed (after EXIF orientation), from the header only.

    Raises DataError ``missing_file``, ``empty_file``, ``corrupt_image`` (unreadable header) or ``image_too_large``.
    """
    p, is_dir = stat_file(path)
    with _open_image(p, max_pixels, is_dir) as img:
        w, h = img.size
        try:
            orientation = _orientation(img)
        except _PIL_DECODE_ERRORS as e:
            raise DataError("corrupt_image", f"cannot read EXIF: {e}", path=p) from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def _int_grey_to_8bit(a: np.ndarray) -> np.ndarray:
    """32-bit integer greys (Pillow mode ``I``) to uint8, by the range the values actually occupy.

    Mode ``I`` does not say how many bits the data uses (TIFF / PGM / some PNG readers give 8-, 12-, 16- or 32-bit
    data this mode), so the values decide: all in ``0..255`` -> taken as 8-bit, unchanged; all in ``0..65535`` ->
    16-bit, scaled like ``I;16`` (``round(v * 255 / 65535)``); anything else (negative values or above 65535) ->
    stretched linearly from its min..max to 0..255 (a constant image becomes black). Nothing is clipped.
    """
    a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo >= 0 and hi <= 255:
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    span = hi - lo
    if span == 0:
        return np.zeros(a.shape, np.uint8)
    return (((a - lo) * 510 + span) // (2 * span)).astype(np.uint8)  # round((a - lo) * 255 / span)


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, P with a transparent index, ...) is composited on white, as transformers'
    ``convert_to_rgb`` does (documents and icons are drawn for a white page; dropping alpha would show whatever
    colour the transparent pixels happen to store). 16-bit integer greys (``I;16*``) are scaled to 8 bits
    (``round(v * 255 / 65535)``) rather than clipped, which is what Pillow's own ``convert("L")`` does. 32-bit
    integer greys (``I``) are mapped by the range their values occupy (8-bit, 16-bit, else min..max; see
    ``_int_grey_to_8bit``): Pillow's ``convert("RGB")`` would clip them at 255.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.int64)
        a = np.clip(a, 0, 65535)
        return _grey_to_rgb(((a * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "I":
        return _grey_to_rgb(_int_grey_to_8bit(np.asarray(img)))
    if mode == "F":
        a = np.asarray(img, np.float32)
        scale = 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else 1.0  # [0,1] floats vs 0-255 floats
        grey = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. LAB / HSV, which Pillow cannot map to RGB
        raise DataError("corrupt_image", f"unsupported image mode {mode}: {e}", path=path) from None


def load_image(path: PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded, upright (EXIF-transposed), 8-bit RGB image.

    See ``_to_rgb`` for the mode conversions (alpha composited on white, 16-bit scaled). For animated images the
    first frame is returned. Raises DataError ``missing_file``, ``empty_file``, ``corrupt_image`` (including
    truncated data) or ``image_too_large`` (checked from the header, before decoding).
    """
    p = check_file(path)
    with _open_image(p, max_pixels) as img:
        try:
            orientation = _orientation(img)
            # LOAD_TRUNCATED_IMAGES is a process-wide Pillow switch; refuse to run with it on rather than return
            # half-grey images silently.
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                raise DataError(
                    "corrupt_image", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing", path=p
                )
            img.load()
            rgb = _to_rgb(img, p)
        except _PIL_DECODE_ERRORS as e:
            raise DataError("corrupt_image", f"cannot decode image: {e}", path=p) from None
    if orientation in _EXIF_TRANSPOSE:
        rgb = rgb.transpose(_EXIF_TRANSPOSE[orientation])
    return rgb
