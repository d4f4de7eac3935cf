"""mini-ImageNet in the Ravi & Larochelle layout: ``<root>/images/<filename>`` beside ``train.csv``,
``val.csv``, ``test.csv`` (header ``filename,label``; 64 / 16 / 20 classes of 600 images).

``<root>`` is ``<data>/miniimagenet`` (or ``<data>/miniimagenet-sample`` with ``sample=True``, the
12-images-per-class sample); see ``datadir``. Each split is decoded once into 84x84 RGB and cached as
``<cache>/<dataset>-<split>-<key>.npz``: ``images: (n_classes, n_per_class, 84, 84, 3)`` uint8, classes in
order of first appearance in the CSV, images in CSV order. An image that is not 84x84 is resized with
Lanczos (with a warning); a grey or CMYK image is converted to RGB. Only images are read, never pickles.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from minimaml.tasks import datadir
from minimaml.tasks.datadir import DataError
from minimaml.tasks.episodes import ClassSplit

SPLITS = ("train", "val", "test")
SIZE = 84
HEADER = ["filename", "label"]


def load_miniimagenet(split: str, data_dir=None, cache_dir=None, sample: bool = False) -> ClassSplit:
    """One split: images (n_classes, n_per_class, 84, 84, 3) uint8; names (n_classes,) WordNet ids."""
    if split not in SPLITS:
        raise ValueError(f"miniimagenet: unknown split {split!r}; expected one of {SPLITS}")
    dataset = "miniimagenet-sample" if sample else "miniimagenet"
    root = datadir.dataset_dir(dataset, data_dir)
    table = root / f"{split}.csv"
    classes = _read_csv(table)
    folder = root / "images"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected the images named in {table} (see docs/data.md)")
    paths = {row: folder / filename for files in classes.values() for row, filename in files}
    for row, path in paths.items():
        if not path.is_file():
            raise DataError(f"{table}: row {row} names {path.name}, but {path} does not exist")

    key = datadir.fingerprint(
        "miniimagenet-v1", SIZE, hashlib.sha256(table.read_bytes()).hexdigest(),
        [datadir.file_stat(path) for path in paths.values()],
    )
    cache = datadir.cache_root(cache_dir) / f"{dataset}-{split}-{key}.npz"
    shape = (len(classes), len(next(iter(classes.values()))), SIZE, SIZE, 3)
    cached = datadir.load_npz(cache, images=shape, names=shape[:1])
    if cached is not None:
        return ClassSplit(cached["images"], cached["names"])

    images = np.empty(shape, dtype=np.uint8)
    resized = 0
    for c, files in enumerate(classes.values()):
        for i, (row, filename) in enumerate(files):
            images[c, i], was_resized = _decode(paths[row], f"{paths[row]} ({table}, row {row})")
            resized += was_resized
    if resized:
        warnings.warn(f"{root / 'images'}: {resized} of {images.shape[0] * images.shape[1]} images of the "
                      f"{split} split were not {SIZE}x{SIZE} and were resized with Lanczos", stacklevel=2)
    split_data = ClassSplit(images, np.array(list(classes)))
    datadir.save_npz(cache, images=split_data.images, names=split_data.names)
    return split_data


def _read_csv(table: Path) -> dict[str, list[tuple[int, str]]]:
    """``{label: [(row, filename), ...]}`` in CSV order; rows are numbered as lines (header = 1)."""
    if not table.is_file():
        raise DataError(f"{table}: split file not found; expected the Ravi & Larochelle CSV (see docs/data.md)")
    with open(table, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    if not lines or [cell.strip() for cell in lines[0]] != HEADER:
        raise DataError(f"{table}: header is {lines[0] if lines else 'missing'}; expected {','.join(HEADER)}")
    classes: dict[str, list[tuple[int, str]]] = {}
    seen: set[str] = set()
    for row, cells in enumerate(lines[1:], start=2):
        if not cells:
            continue
        if len(cells) != 2 or not all(cell.strip() for cell in cells):
            raise DataError(f"{table}: row {row} is {cells}; expected two fields, filename,label")
        filename, label = (cell.strip() for cell in cells)
        if filename in seen:
            raise DataError(f"{table}: row {row} repeats {filename}")
        seen.add(filename)
        classes.setdefault(label, []).append((row, filename))
    if not classes:
        raise DataError(f"{table}: no rows; expected filename,label rows")
    counts = {label: len(files) for label, files in classes.items()}
    most = max(counts.values())
    for label, count in counts.items():
        if count != most:
            raise DataError(f"{table}: class {label} has {count} images, others have {most}; expected equal counts")
    return classes


def _decode(path: Path, where: str) -> tuple[np.ndarray, bool]:
    """An image file -> ((84, 84, 3) uint8 RGB, whether it had to be resized)."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: not a readable image: {err}") from err
    if rgb.size == (SIZE, SIZE):
        return np.asarray(rgb, dtype=np.uint8), False
    return np.asarray(rgb.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8), True
