"""Omniglot (Lake et al.): read the official files, preprocess once, split like the MAML authors' code.

Input, in ``<data>/omniglot/`` (see ``datadir``): ``images_background.zip`` and ``images_evaluation.zip``
(or their extracted folders ``images_background/``, ``images_evaluation/``), each holding
``<part>/<Alphabet>/characterNN/XXXX_YY.png``: 105x105 1-bit drawings, 20 per character,
30 + 20 alphabets, 964 + 659 = 1623 characters.

Preprocessing (cached as ``<cache>/omniglot-28x28-<key>.npz``, written only after every input file was
validated): each drawing is converted to grey, resized to 28x28 with Lanczos and inverted, so that 255
is stroke and 0 is background: ``characters: (1623, 20, 28, 28)`` uint8, plus the character names.

Split (``split_characters``): a seeded shuffle of the 1623 characters, 1100 train, 100 val, 423 test
(the authors' code: 1200 meta-training characters, 100 of them held out for validation). Each rotation
by 0/90/180/270 degrees is its own class, so train has 4400 classes.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import urllib.request
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from minimaml.tasks import datadir
from minimaml.tasks.datadir import DataError
from minimaml.tasks.episodes import ClassSplit

PARTS = ("images_background", "images_evaluation")
URLS = {part: f"https://github.com/brendenlake/omniglot/raw/master/python/{part}.zip" for part in PARTS}
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718", "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SIZE = 28  # side of the preprocessed images
ROTATIONS = (0, 90, 180, 270)


@dataclass(frozen=True)
class OmniglotCounts:
    """What a valid copy holds; tests pass smaller counts for fake datasets."""

    alphabets: tuple[int, int] = (30, 20)  # images_background, images_evaluation
    characters: tuple[int, int] = (964, 659)
    drawings: int = 20
    image_size: int = 105


def load_omniglot(
    data_dir=None, cache_dir=None, seed: int = 1, n_train: int = 1100, n_val: int = 100,
    rotations: tuple[int, ...] = ROTATIONS, download: bool = False, counts: OmniglotCounts = OmniglotCounts(),
) -> dict[str, ClassSplit]:
    """The splits ``{"train", "val", "test"}``, each ``images: (n_classes, 20, 28, 28, 1)`` uint8."""
    characters = load_characters(data_dir, cache_dir, download, counts)
    return split_characters(characters, seed, n_train, n_val, rotations)


def load_characters(
    data_dir=None, cache_dir=None, download: bool = False, counts: OmniglotCounts = OmniglotCounts()
) -> ClassSplit:
    """All characters, from the cache or preprocessed now: images (1623, 20, 28, 28) uint8, 255 = stroke."""
    root = datadir.dataset_dir("omniglot", data_dir)
    if download:
        download_omniglot(data_dir)
    sources = {part: _source(root, part) for part in PARTS}
    stats = {part: _source_stats(path) for part, path in sources.items()}
    key = datadir.fingerprint("omniglot-v1", SIZE, stats, asdict(counts))
    cache = datadir.cache_root(cache_dir) / f"omniglot-{SIZE}x{SIZE}-{key}.npz"
    n_chars = sum(counts.characters)
    cached = datadir.load_npz(cache, images=(n_chars, counts.drawings, SIZE, SIZE), names=(n_chars,))
    if cached is not None:
        return ClassSplit(cached["images"], cached["names"])

    images, names = [], []
    for part in PARTS:
        part_images, part_names = _read_part(sources[part], part, counts)
        images.append(part_images)
        names += part_names
    characters = ClassSplit(np.concatenate(images), np.array(names))
    datadir.save_npz(cache, images=characters.images, names=characters.names)
    return characters


def split_characters(
    characters: ClassSplit, seed: int = 1, n_train: int = 1100, n_val: int = 100,
    rotations: tuple[int, ...] = ROTATIONS,
) -> dict[str, ClassSplit]:
    """Seeded shuffle, then train / val / rest = test; every rotation of a character is its own class.

    characters.images: (n_chars, M, 28, 28) -> each split's images: (n * len(rotations), M, 28, 28, 1),
    class ``r + len(rotations) * c`` being character c rotated counter-clockwise by ``rotations[r]``.
    """
    n_chars = len(characters.images)
    if n_train < 1 or n_val < 0 or n_train + n_val >= n_chars:
        raise ValueError(f"omniglot: n_train={n_train}, n_val={n_val} leave no test characters out of {n_chars}")
    if not rotations or any(r not in ROTATIONS for r in rotations):
        raise ValueError(f"omniglot: rotations must be a non-empty subset of {ROTATIONS}, got {rotations}")
    order = np.random.default_rng(seed).permutation(n_chars)
    chosen = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: _rotated(characters, index, rotations) for name, index in chosen.items()}


def _rotated(characters: ClassSplit, index: np.ndarray, rotations: tuple[int, ...]) -> ClassSplit:
    images = characters.images[index]  # (n, M, H, W)
    turned = np.stack([np.rot90(images, r // 90, axes=(2, 3)) for r in rotations], axis=1)  # (n, R, M, H, W)
    names = [f"{name}/rot{r}" for name in characters.names[index] for r in rotations]
    return ClassSplit(np.ascontiguousarray(turned.reshape(-1, *images.shape[1:], 1)), np.array(names))


def download_omniglot(data_dir=None) -> Path:
    """Fetch the official zips that are missing from ``<data>/omniglot/``, checked by md5; the folder."""
    root = datadir.dataset_dir("omniglot", data_dir)
    for part in PARTS:
        target = root / f"{part}.zip"
        if target.exists() or (root / part).is_dir():
            continue

        def fetch_and_check(tmp: Path, part=part, target=target) -> None:
            fetch_url(URLS[part], tmp)
            digest = hashlib.md5(tmp.read_bytes()).hexdigest()
            if digest != MD5[part]:
                raise DataError(f"{URLS[part]}: downloaded md5 {digest}, expected {MD5[part]}; {target} not written")

        datadir.atomic_write(target, fetch_and_check)
    return root


def fetch_url(url: str, dest: Path) -> None:
    """Download ``url`` into the file ``dest`` (tests replace this function)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out)


def _source(root: Path, part: str) -> Path:
    """The zip of ``part`` if present, else its extracted folder."""
    for path in (root / f"{part}.zip", root / part):
        if path.exists():
            return path
    raise DataError(
        f"{root}: found neither {part}.zip nor the folder {part}/; expected the official Omniglot files "
        f"(see docs/data.md), or call with download=True"
    )


def _source_stats(path: Path) -> list:
    if path.is_file():
        return datadir.file_stat(path)
    return sorted([str(p.relative_to(path)), *datadir.file_stat(p)[1:]] for p in path.rglob("*.png"))


def _members(source: Path, part: str) -> dict[str, bytes]:
    """``{"<part>/<Alphabet>/<character>/<file>.png": bytes}`` for every PNG of a zip or folder (~15 MB)."""
    if source.is_dir():
        return {
            f"{part}/{p.relative_to(source).as_posix()}": p.read_bytes()
            for p in source.rglob("*.png")
            if _is_drawing(p.as_posix())
        }
    try:
        with zipfile.ZipFile(source) as archive:
            names = [name for name in archive.namelist() if _is_drawing(name)]
            members = {}
            for name in names:
                try:
                    members[name] = archive.read(name)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise DataError(f"{source}: member {name} is corrupt (damaged zip?): {err}") from err
            return members
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{source}: not a readable zip archive (truncated or corrupt download?): {err}") from err


def _is_drawing(name: str) -> bool:
    """A PNG, not macOS metadata (``__MACOSX/``, ``._*``) or another hidden file."""
    return name.endswith(".png") and "__MACOSX" not in name and not name.rsplit("/", 1)[-1].startswith(".")


def _read_part(source: Path, part: str, counts: OmniglotCounts) -> tuple[np.ndarray, list[str]]:
    """Validate and preprocess one part: images (n_characters, drawings, 28, 28) uint8, names."""
    i = PARTS.index(part)
    n_alphabets, n_characters = counts.alphabets[i], counts.characters[i]
    members = _members(source, part)
    drawings: dict[tuple[str, str], list[str]] = {}
    for name in members:
        pieces = name.split("/")
        if len(pieces) != 4 or pieces[0] != part:
            raise DataError(f"{source}: unexpected file {name}; expected {part}/<Alphabet>/<character>/<file>.png")
        drawings.setdefault((pieces[1], pieces[2]), []).append(name)

    alphabets = {alphabet for alphabet, _ in drawings}
    if len(alphabets) != n_alphabets or len(drawings) != n_characters:
        raise DataError(
            f"{source}: found {len(alphabets)} alphabets and {len(drawings)} characters; "
            f"expected {n_alphabets} alphabets and {n_characters} characters"
        )
    images = np.empty((n_characters, counts.drawings, SIZE, SIZE), dtype=np.uint8)
    for c, key in enumerate(sorted(drawings)):
        files = sorted(drawings[key])
        if len(files) != counts.drawings:
            raise DataError(f"{source}: {part}/{key[0]}/{key[1]} has {len(files)} drawings; expected {counts.drawings}")
        for d, name in enumerate(files):
            images[c, d] = _preprocess(members[name], f"{source}: {name}", counts.image_size)
    return images, [f"{alphabet}/{character}" for alphabet, character in sorted(drawings)]


def _preprocess(data: bytes, where: str, image_size: int) -> np.ndarray:
    """A PNG's bytes -> (28, 28) uint8, Lanczos-resized in grey, inverted (255 = stroke)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: not a readable PNG image: {err}") from err
    if image.size != (image_size, image_size):
        raise DataError(f"{where}: image is {image.size[0]}x{image.size[1]}; expected {image_size}x{image_size}")
    # Grey first: Pillow resizes 1-bit images with nearest neighbour, whatever filter is asked for.
    small = image.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)
