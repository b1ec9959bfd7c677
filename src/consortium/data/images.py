"""Images of any size as a :class:`~consortium.data.datasets.Table`: from a folder of PNG/JPEG files or a ``.npy`` array.

Each image becomes one row of ``X`` (float32, channels first: the row is the
(channels, height, width) array flattened), and the table's ``image_shape``
says how to unflatten it, so an image model (a CNN) sees (batch, C, H, W).
Nothing is downloaded and nothing is unpickled: a folder is read with Pillow,
an array with ``np.load(..., allow_pickle=False)``.

- :func:`load_image_folder`: ``root/<class>/*.png|*.jpg|*.jpeg``, classes
  sorted by folder name, each image resized (bilinear) to one size, RGB or
  grayscale, values scaled to [0, 1].
- :func:`load_image_array`: a (N, H, W), (N, H, W, C) or (N, C, H, W) array and
  its labels (integers, or strings whose sorted set becomes the classes).
- :func:`synthetic_images` and :func:`write_image_folder`: a generated set of
  class-dependent shapes (for examples and tests that run offline) and a way to
  lay a table out as such a folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from consortium.data.datasets import Table
from consortium.data.stream import StreamedTable
from consortium.errors import ConfigError, DataError

#: File suffixes read as images (case-insensitive); other files in a class folder are ignored.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Colour modes a folder can be read in: Pillow's mode name -> channels.
MODES: dict[str, int] = {"RGB": 3, "L": 1}

#: Layouts of a 4-D image array (N: images, C: channels, H: height, W: width).
LAYOUTS: tuple[str, ...] = ("NHWC", "NCHW")

#: Images converted to float32 at a time from an array (bounds the temporary copies).
_CHUNK_VALUES = 1 << 24


def load_image_folder(
    root: str | Path, *, size: int | tuple[int, int], mode: str = "RGB", classes: list[str] | tuple[str, ...] | None = None,
    stream: bool = False,
) -> Table | StreamedTable:
    """Read ``root/<class>/<image>`` files into a table, one row per image.

    The classes are the sub-folders of ``root``, sorted by name (hidden
    folders, whose names start with a dot, are skipped), unless ``classes``
    names them: then a class index means the same at every site even where a
    site has no image of some class (a missing folder is then allowed, and a
    folder not named is an error); the images of a class
    are its files ending in .png, .jpg or .jpeg (any case), read in name
    order. Other files in a class folder are ignored. Each image is turned
    upright by its EXIF orientation, converted to ``mode``, resized to
    ``size`` with bilinear interpolation and scaled from 0..255 to [0, 1]; a
    16-bit grayscale PNG keeps its depth (scaled from 0..65535, resized in
    floating point, repeated over 3 channels for RGB) instead of being clipped
    to 8 bits.

    Args:
        root: the folder holding one sub-folder per class.
        size: (height, width) every image is resized to, or one int for a square.
        mode: ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel).
        classes: the class folder names in index order (default: the sub-folders, sorted).
        stream: read each image only when a step asks for it (a ``StreamedTable``), for a folder
            larger than memory; an unreadable image then fails at the step that reads it.

    Returns:
        A table with X float32 (n, C * H * W) in channel-first order, y the
        class indices, ``classes`` the folder names (or ``classes``), ``image_shape`` (C, H, W)
        and feature names ``<band>_<row>_<col>`` (band R, G, B or L); with ``stream``, the same
        records read on demand.

    Raises:
        ConfigError: ``size`` or ``mode`` is out of range.
        DataError: ``root`` is missing or not a folder, it holds no class
            folder, an image lies directly in ``root``, a class folder holds no
            image, a folder is not among ``classes``, no image is found, or an
            image cannot be read (each names the path and the fix).
    """
    height, width = _size(size)
    if mode not in MODES:
        raise ConfigError(f"image mode '{mode}' is not supported: use 'RGB' (3 channels) or 'L' (grayscale)")
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {what}: give the folder that holds one sub-folder of images per class")
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    if loose:
        raise DataError(
            f"image {loose[0]} lies directly in {root}: move each image into a sub-folder named after its class"
        )
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not class_dirs:
        raise DataError(f"image folder {root} holds no class folder: put each class's images in {root}/<class>/")
    if classes is not None:
        names = tuple(classes)
        if not names or not all(isinstance(c, str) and c for c in names) or len(set(names)) != len(names):
            raise ConfigError(f"classes must be distinct non-empty folder names, got {list(names)!r}")
        stray = [p for p in class_dirs if p.name not in names]
        if stray:
            raise DataError(f"folder {stray[0]} is not one of the classes {list(names)}: rename or move it, or name its class")
        class_dirs = [root / c for c in names]
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(class_dirs):
        if classes is not None and not folder.is_dir():
            continue  # this site has no image of that class
        found = sorted((p for p in folder.iterdir() if p.is_file() and _is_image(p)), key=lambda p: p.name)
        if not found:
            raise DataError(
                f"class folder {folder} holds no PNG or JPEG image: add its images (.png, .jpg, .jpeg) or remove the folder"
            )
        files += [(p, index) for p in found]
    if not files:
        raise DataError(f"image folder {root} holds none of the classes {list(classes or [])}: check the folder and the names")
    channels = MODES[mode]
    y = np.fromiter((index for _, index in files), dtype=np.int64, count=len(files))
    names = _pixel_names(("L",) if mode == "L" else ("R", "G", "B"), height, width)
    layout = {"feature_names": names, "classes": tuple(p.name for p in class_dirs), "image_shape": (channels, height, width)}
    if stream:
        return StreamedTable(ImageFiles([p for p, _ in files], y, mode, (height, width)), labels=y, **layout)
    X = np.empty((len(files), channels * height * width), dtype=np.float32)
    for row, (path, _) in enumerate(files):
        X[row] = _read_image(path, mode, height, width).reshape(-1)
    return Table(X=X, y=y, **layout)


class ImageFiles:
    """A map-style dataset of image files: item ``i`` is (the image as float32 (C, H, W) in [0, 1], its
    class index), read and resized when asked for (``load_image_folder(..., stream=True)``)."""

    def __init__(self, files: list[Path], labels: np.ndarray, mode: str, size: tuple[int, int]) -> None:
        self.files, self.labels, self.mode, self.size = files, labels, mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return _read_image(self.files[i], self.mode, *self.size), int(self.labels[i])


def load_image_array(
    images: str | Path | np.ndarray,
    labels: str | Path | np.ndarray,
    *,
    layout: str | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
    stream: bool = False,
) -> Table | StreamedTable:
    """Turn an array of images and one of labels (``.npy`` files or arrays) into a table.

    Shapes: (N, H, W) is N single-channel images; a 4-D array is (N, H, W, C)
    with ``layout="NHWC"`` or (N, C, H, W) with ``layout="NCHW"``. Without
    ``layout`` a 4-D array's layout is inferred only when exactly one of its
    axes 1 and 3 has 1, 3 or 4 entries (a channel count); otherwise, as for
    (N, 3, 32, 3), the layout must be given. Values: unsigned integers are
    scaled to [0, 1] by their type's maximum (uint8: 255, uint16: 65535), bools
    become 0/1, and floats and signed integers are kept as they are.

    Labels: integers are class indices (the classes default to "0".."K-1",
    K = the largest label + 1); strings name classes (by default their sorted
    distinct values). ``classes`` fixes the class names and their order.

    Args:
        images: a path to a ``.npy`` file, or an array.
        labels: a path to a ``.npy`` file, or a 1-D array with one label per image.
        layout: ``"NHWC"`` or ``"NCHW"`` for a 4-D array (see above); ``None`` infers it when unambiguous.
        classes: the class names, in index order.
        stream: leave the images in the (memory-mapped) file and convert each batch when a step reads
            it (a ``StreamedTable``), for an array larger than memory; a non-finite value then fails at
            the step that reads it.

    Returns:
        A table with X float32 (N, C * H * W) in channel-first order, y int64,
        the classes, ``image_shape`` (C, H, W) and feature names ``c<k>_<row>_<col>``; with
        ``stream``, the same records read on demand.

    Raises:
        ConfigError: ``layout`` is not one of :data:`LAYOUTS`.
        DataError: a file is missing, is not a plain ``.npy`` array (a pickle or
            an object array is refused), the shapes or counts do not match, a
            value is not finite, or a label is outside the classes.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"image layout '{layout}' is not supported: use 'NHWC' or 'NCHW'")
    arr, source = _load_array(images, "images", mmap=True)
    lab, lab_source = _load_array(labels, "labels", mmap=False)
    if arr.ndim == 3:
        if layout is not None:
            raise DataError(f"{source} has shape {arr.shape}, (N, H, W) with no channel axis: leave layout unset")
        arr = arr[:, None]
    elif arr.ndim == 4:
        arr = arr if _layout(arr.shape, layout, source) == "NCHW" else arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{source} has shape {arr.shape}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W)"
        )
    if arr.dtype.kind not in "uifb":
        raise DataError(f"{source} holds {arr.dtype} values: images must be numbers (uint8, uint16 or float)")
    if lab.ndim != 1:
        raise DataError(f"{lab_source} has shape {lab.shape}: labels must be one value per image, shape (N,)")
    if len(lab) != len(arr):
        raise DataError(
            f"{source} holds {len(arr)} images but {lab_source} holds {len(lab)} labels: give one label per image"
        )
    y, names = _labels(lab, lab_source, classes)
    n, channels, height, width = arr.shape
    scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind == "u" else 1.0
    layout = {"feature_names": _pixel_names(tuple(f"c{k}" for k in range(channels)), height, width), "classes": names,
              "image_shape": (int(channels), int(height), int(width))}
    if stream:
        return StreamedTable(ImageRows(arr, y, scale), labels=y, **layout)
    X = np.empty((n, channels * height * width), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // max(1, X.shape[1]))
    for start in range(0, n, step):
        block = np.asarray(arr[start : start + step], dtype=np.float32).reshape(-1, X.shape[1])
        X[start : start + step] = block / scale if scale != 1.0 else block
        bad = ~np.isfinite(X[start : start + step])
        if bad.any():
            raise DataError(
                f"{source} has a NaN or infinite value in image {start + int(np.argwhere(bad)[0][0])}: "
                "clean or drop that image"
            )
    return Table(X=X, y=y, **layout)


class ImageRows:
    """A map-style dataset over an (N, C, H, W) array left where it is (a memory-mapped ``.npy``): item ``i``
    is (image ``i`` as float32 scaled by ``scale``, its class index) (``load_image_array(..., stream=True)``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, scale: float) -> None:
        self.images, self.labels, self.scale = images, labels, np.float32(scale)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.asarray(self.images[i], dtype=np.float32) / self.scale, int(self.labels[i])


# ---------------------------------------------------------------------------
# Generated images, for examples and tests that run offline

#: The shapes :func:`synthetic_images` draws, one per class (in this order).
SHAPES: tuple[str, ...] = (
    "horizontal-stripes", "vertical-stripes", "ring", "cross", "checkerboard", "disc", "diagonal-stripes",
    "square", "triangle", "frame",
)


def synthetic_images(
    n: int, *, size: int = 32, n_classes: int = 10, seed: int = 0, channels: int = 3, noise: float = 0.1,
) -> Table:
    """``n`` generated images of class-dependent shapes on random backgrounds, values in [0, 1].

    Class k draws shape ``SHAPES[k]`` (a disc, a square, a ring, stripes, a
    checkerboard...) at a random position and scale, in a random foreground
    colour on a random background colour, plus Gaussian pixel noise. Colour
    and brightness carry no information about the class and the position
    varies, so a linear model on the pixels does poorly while a small CNN
    learns the shapes. Labels are balanced (class i % n_classes, shuffled).

    Args:
        n: number of images.
        size: height and width in pixels (at least 8).
        n_classes: number of classes, 2..len(SHAPES).
        seed: the generator's seed (same seed, same images).
        channels: 3 (colour) or 1 (grayscale).
        noise: standard deviation of the Gaussian pixel noise.

    Returns:
        A table with ``image_shape`` (channels, size, size) and classes named after the shapes.

    Raises:
        ConfigError: an argument is out of range.
    """
    if n < 1 or size < 8 or not 2 <= n_classes <= len(SHAPES) or channels not in (1, 3) or noise < 0:
        raise ConfigError(
            f"synthetic_images needs n >= 1, size >= 8, 2 <= n_classes <= {len(SHAPES)}, channels 1 or 3 and "
            f"noise >= 0; got n={n}, size={size}, n_classes={n_classes}, channels={channels}, noise={noise}"
        )
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) / size  # pixel centres in [0, 1)
    X = np.empty((n, channels, size, size), dtype=np.float32)
    for i, label in enumerate(y):
        mask = _shape_mask(SHAPES[label], rows, cols, rng)
        fg, bg = rng.uniform(0, 1, (2, channels)).astype(np.float32)
        while np.abs(fg - bg).max() < 0.35:  # keep the shape visible
            fg, bg = rng.uniform(0, 1, (2, channels)).astype(np.float32)
        X[i] = np.where(mask, fg[:, None, None], bg[:, None, None])
    X += rng.normal(0.0, noise, X.shape).astype(np.float32)
    np.clip(X, 0.0, 1.0, out=X)
    bands = ("L",) if channels == 1 else ("R", "G", "B")
    return Table(X=X.reshape(n, -1), y=y, feature_names=_pixel_names(bands, size, size),
                 classes=SHAPES[:n_classes], image_shape=(channels, size, size))


def write_image_folder(table: Table, root: str | Path, *, suffix: str = ".png") -> list[Path]:
    """Write each image of ``table`` to ``root/<class>/<row>.png`` (or .jpg): the layout :func:`load_image_folder` reads.

    Values are taken as [0, 1] and stored as 8-bit (rounded); a class with no
    image gets no folder.

    Args:
        table: a table with an ``image_shape`` of 1 or 3 channels.
        root: the folder to write into (created if missing).
        suffix: ``.png`` (lossless) or ``.jpg``.

    Returns:
        The paths written, in row order.

    Raises:
        DataError: the table holds no images of 1 or 3 channels.
        ConfigError: ``suffix`` is not an image suffix.
    """
    from PIL import Image

    if table.image_shape is None or table.image_shape[0] not in (1, 3) or not table.classes:
        raise DataError("write_image_folder needs a classification table whose image_shape has 1 or 3 channels")
    if suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"image suffix '{suffix}' is not supported: use one of {', '.join(IMAGE_SUFFIXES)}")
    channels, height, width = table.image_shape
    root = Path(root)
    paths = []
    digits = len(str(max(table.n_rows - 1, 0)))
    for row in range(table.n_rows):
        pixels = np.clip(np.rint(table.X[row].reshape(channels, height, width) * 255), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[0] if channels == 1 else pixels.transpose(1, 2, 0), mode="L" if channels == 1 else "RGB")
        folder = root / table.classes[int(table.y[row])]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{row:0{digits}d}{suffix}"
        image.save(path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------
# Helpers


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ConfigError(f"image size must be (height, width) of positive ints, or one int; got {size!r}")
    return int(pair[0]), int(pair[1])


def _read_image(path: Path, mode: str, height: int, width: int) -> np.ndarray:
    """One image as float32 (C, H, W) in [0, 1]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):  # 16-bit grayscale (a scan, an X-ray): "L" would clip it at 255
                deep = np.asarray(image, dtype=np.float32)
                if deep.min() < 0 or deep.max() > 65535:
                    raise DataError(
                        f"image {path} holds values outside 0..65535 ({image.mode}): save it as 8- or 16-bit PNG"
                    )
                fine = Image.fromarray(deep / np.float32(65535.0)).resize((width, height), Image.Resampling.BILINEAR)
                gray = np.asarray(fine, dtype=np.float32)[None]
                return gray if mode == "L" else np.repeat(gray, MODES[mode], axis=0)
            image = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read image {path} ({reason}): replace the file with a valid PNG or JPEG, or remove it") from exc
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels / np.float32(255.0)


def _pixel_names(bands: tuple[str, ...], height: int, width: int) -> tuple[str, ...]:
    return tuple(f"{b}_{r}_{c}" for b in bands for r in range(height) for c in range(width))


def _load_array(value: str | Path | np.ndarray, what: str, *, mmap: bool) -> tuple[np.ndarray, str]:
    """An array and how to name it in an error: loaded from a .npy file without pickle, or given."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            raise DataError(f"the {what} array holds Python objects: give a numeric (or string, for labels) array")
        return value, f"the {what} array"
    path = Path(value)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist: give the path of a .npy file written by np.save")
    with path.open("rb") as f:
        magic = f.read(6)
    if not magic.startswith((b"\x93NUMPY", b"PK")):  # a .npy header, or a .npz (zip) archive
        raise DataError(f"{what} file {path} is not a .npy array (no NumPy header): write it with np.save")
    try:
        loaded = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle, which is refused
        raise DataError(
            f"{what} file {path} cannot be read without unpickling Python objects ({exc}): save a plain numeric "
            "or string array with np.save(path, array, allow_pickle=False)"
        ) from exc
    except OSError as exc:
        raise DataError(f"{what} file {path} is not a .npy array ({exc}): write it with np.save") from exc
    if not isinstance(loaded, np.ndarray):  # an .npz archive
        loaded.close()
        raise DataError(f"{what} file {path} is an .npz archive: save each array to its own .npy file with np.save")
    return loaded, str(path)


def _layout(shape: tuple[int, ...], layout: str | None, source: str) -> str:
    if layout is not None:
        return layout
    first, last = shape[1] in (1, 3, 4), shape[3] in (1, 3, 4)
    if first != last:
        return "NCHW" if first else "NHWC"
    raise DataError(
        f"{source} has shape {shape}, which could be (N, H, W, C) or (N, C, H, W): pass layout='NHWC' or layout='NCHW'"
    )


def _labels(lab: np.ndarray, source: str, classes: list[str] | tuple[str, ...] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices and class names from integer or string labels."""
    if classes is not None:
        classes = tuple(classes)
        if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
            raise DataError(f"classes must be distinct strings, got {list(classes)!r}")
    if lab.dtype.kind in "iub":
        y = lab.astype(np.int64)
        if len(y) and y.min() < 0:
            raise DataError(f"{source} holds the label {int(y.min())}: integer labels are class indices, 0 or more")
        top = int(y.max()) + 1 if len(y) else 1
        names = classes if classes is not None else tuple(str(k) for k in range(top))
        if top > len(names):
            raise DataError(
                f"{source} holds the label {top - 1} but {len(names)} classes are named: name one class per index"
            )
        return y, names
    if lab.dtype.kind in "US":
        text = lab.astype(str) if lab.dtype.kind == "U" else np.char.decode(lab, "utf-8")
        names = classes if classes is not None else tuple(str(c) for c in np.unique(text))
        index = {c: k for k, c in enumerate(names)}
        unknown = [v for v in np.unique(text) if v not in index]
        if unknown:
            raise DataError(f"{source} holds the label {str(unknown[0])!r}, which is not one of the classes {list(names)}")
        return np.fromiter((index[v] for v in text), dtype=np.int64, count=len(text)), names
    raise DataError(f"{source} holds {lab.dtype} labels: labels must be integers (class indices) or strings (class names)")


def _shape_mask(shape: str, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of ``shape`` drawn at a random centre and scale on a grid of [0, 1) coordinates."""
    r = rng.uniform(0.18, 0.32)  # half-size
    cy, cx = rng.uniform(r, 1 - r, 2)
    dy, dx = rows - cy, cols - cx
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    period = rng.uniform(0.12, 0.2)
    phase = rng.uniform(0, period)
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return inside
    if shape == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= 0.55 * r)
    if shape == "cross":
        return inside & ((np.abs(dy) <= 0.3 * r) | (np.abs(dx) <= 0.3 * r))
    if shape == "horizontal-stripes":
        return inside & (((dy + phase) % period) < period / 2)
    if shape == "vertical-stripes":
        return inside & (((dx + phase) % period) < period / 2)
    if shape == "diagonal-stripes":
        return inside & (((dx + dy + phase) % (period * math.sqrt(2))) < period * math.sqrt(2) / 2)
    if shape == "checkerboard":
        return inside & ((((dy + phase) // period) + ((dx + phase) // period)) % 2 == 0)
    if shape == "triangle":
        return inside & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return inside & ((np.abs(dy) >= 0.6 * r) | (np.abs(dx) >= 0.6 * r))  # frame
