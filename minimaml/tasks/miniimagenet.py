"""mini-ImageNet in the Ravi & Larochelle layout: ``<root>/images/<filename>`` beside ``train.csv``,
``val.csv``, ``test.csv`` (header ``filename,label``; 64 / 16 / 20 classes of 600 images).

``<root>`` is ``<data>/miniimagenet`` (or ``<data>/miniimagenet-sample`` with ``sample=True``, the
12-images-per-class sample); see ``datadir``. Each split is decoded once into 84x84 RGB and cached as
``<cache>/<dataset>-<split>-<key>.npz``: ``images: (n_classes, n_per_class, 84, 84, 3)`` uint8, classes in
order of first appearance in the CSV, images in CSV order. An image that is not 84x84 is resized with
Lanczos (with a warning); a grey or CMYK image is converted to RGB. Only images are read, never pickles.

Checks (each a ``DataError`` naming the file): every row's label is its file's WordNet id (the name's
first 9 characters, ``n`` and 8 digits); no class is in two splits (against the other CSVs present);
where ``<root>/SHA256SUMS.images`` exists (``sha256  filename`` lines), every image of the split must be
listed there and match. Every image is hashed whenever the cache is built (a first use, or files that
changed): no record of earlier checks by size and mtime, which a bit flip that keeps both would pass, so
the cache only ever holds pixels of verified files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
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
CHECKSUMS = "SHA256SUMS.images"  # beside images/, optional: "<sha256>  <filename>" per line
WORDNET_ID = re.compile(r"n[0-9]{8}")


def load_miniimagenet(split: str, data_dir=None, cache_dir=None, sample: bool = False) -> ClassSplit:
    """One split: images (n_classes, n_per_class, 84, 84, 3) uint8; names (n_classes,) WordNet ids."""
    if split not in SPLITS:
        raise ValueError(f"miniimagenet: unknown split {split!r}; expected one of {SPLITS}")
    dataset = "miniimagenet-sample" if sample else "miniimagenet"
    root = datadir.dataset_dir(dataset, data_dir)
    table = root / f"{split}.csv"
    classes = _read_csv(table)
    _check_counts(table, classes)
    _check_disjoint(root, split, table, classes)
    folder = root / "images"
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; expected the images named in {table} (see docs/data.md)")
    paths = {row: folder / filename for files in classes.values() for row, filename in files}
    for row, path in paths.items():
        datadir.check_file(path, f"{table}: row {row} names {path.name}")

    checksums = root / CHECKSUMS
    checksums_digest = _sha256(checksums) if checksums.is_file() else None
    key_parts = ["miniimagenet-v1", SIZE, _sha256(table), [datadir.file_stat(path) for path in paths.values()]]
    if checksums_digest is not None:  # a cache built from these very files was verified against these sums
        key_parts.append(checksums_digest)
    cache_folder = datadir.cache_root(cache_dir)
    cache = cache_folder / f"{dataset}-{split}-{datadir.fingerprint(*key_parts)}.npz"
    shape = (len(classes), len(next(iter(classes.values()))), SIZE, SIZE, 3)
    cached = datadir.load_npz(cache, images=shape, names=shape[:1])
    if cached is not None:
        return ClassSplit(cached["images"], cached["names"])

    writable = datadir.cache_writable(cache)  # before the work: a folder we cannot write costs a warning only
    if checksums_digest is not None:
        _verify_checksums(checksums, table, paths)
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
    if writable:
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
        wordnet_id = WORDNET_ID.match(filename)
        if wordnet_id is None:
            raise DataError(f"{table}: row {row}: file {filename} does not start with a WordNet id (n and 8 "
                            f"digits); expected <wnid><number>.jpg")
        if wordnet_id.group() != label:
            raise DataError(f"{table}: row {row}: label {label} disagrees with the WordNet id {wordnet_id.group()} "
                            f"of its file {filename}")
        if filename in seen:
            raise DataError(f"{table}: row {row} repeats {filename}")
        seen.add(filename)
        classes.setdefault(label, []).append((row, filename))
    if not classes:
        raise DataError(f"{table}: no rows; expected filename,label rows")
    return classes


def _check_counts(table: Path, classes: dict) -> None:
    """Every class of the split has the same number of images."""
    counts = {label: len(files) for label, files in classes.items()}
    most = max(counts.values())
    for label, count in counts.items():
        if count != most:
            raise DataError(f"{table}: class {label} has {count} images, others have {most}; expected equal counts")


def _check_disjoint(root: Path, split: str, table: Path, classes: dict) -> None:
    """No class of ``split`` is in another split's CSV (those present beside it are read)."""
    for other in SPLITS:
        other_table = root / f"{other}.csv"
        if other == split or not other_table.is_file():
            continue
        shared = [label for label in _read_csv(other_table) if label in classes]
        if shared:
            listed = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
            raise DataError(f"{table} and {other_table}: class {listed} is in both the {split} and the {other} "
                            f"split; the splits must be disjoint")


def _sha256(path: Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_checksums(checksums: Path) -> dict[str, str]:
    """``{filename: sha256}`` from a ``sha256sum`` listing (``<64 hex digits>  <filename>`` per line)."""
    expected = {}
    for number, line in enumerate(checksums.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise DataError(f"{checksums}: line {number} is {line!r}; expected '<sha256>  <filename>'")
        expected[name] = digest
    return expected


def _verify_checksums(checksums: Path, table: Path, paths: dict) -> None:
    """Check every image of the split against ``checksums``: hash each file, whatever its size and mtime."""
    expected = _read_checksums(checksums)
    for row, path in paths.items():
        if path.name not in expected:
            raise DataError(f"{table}: row {row} names {path.name}, which {checksums} does not list")
        digest = _sha256(path)
        if digest != expected[path.name]:
            raise DataError(f"{path} ({table}, row {row}): sha256 {digest} does not match {expected[path.name]} "
                            f"in {checksums}; the image is corrupt or was changed")


def _decode(path: Path, where: str) -> tuple[np.ndarray, bool]:
    """An image file -> ((84, 84, 3) uint8 RGB, whether it had to be resized)."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except Image.UnidentifiedImageError as err:  # its message repeats the path; say what is wrong instead
        raise DataError(f"{where}: not a readable image: not in an image format Pillow recognises") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: not a readable image: {err}") from err
    if rgb.size == (SIZE, SIZE):
        return np.asarray(rgb, dtype=np.uint8), False
    return np.asarray(rgb.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.uint8), True
