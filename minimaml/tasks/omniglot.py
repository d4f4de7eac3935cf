"""Omniglot (Lake et al.): read the official files, preprocess once, split like the MAML authors' code.

Input, in ``<data>/omniglot/`` (see ``datadir``): ``images_background.zip`` and ``images_evaluation.zip``
(or their extracted folders ``images_background/``, ``images_evaluation/``), each holding
``<part>/<Alphabet>/characterNN/XXXX_YY.png``: 105x105 1-bit drawings, 20 per character,
30 + 20 alphabets, 964 + 659 = 1623 characters. Every ``.png`` must really be a PNG (a JPEG under that
name is an error); other files (e.g. a README.txt) are ignored with a warning naming them, macOS metadata
(``__MACOSX/``, ``._*``) and hidden files silently.

Preprocessing (cached as ``<cache>/omniglot-28x28-<key>.npz``, written only after every input file was
validated): each drawing is converted to grey, resized to 28x28 with Lanczos and inverted, so that 255
is stroke and 0 is background: ``characters: (1623, 20, 28, 28)`` uint8, plus the character names.

Split (``split_characters``): a seeded shuffle of the 1623 characters, 1100 train, 100 val, 423 test
(the authors' code: 1200 meta-training characters, 100 of them held out for validation). Each rotation
by 0/90/180/270 degrees is its own class, so train has 4400 classes.
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from minimaml.tasks import datadir, download
from minimaml.tasks.datadir import DataError
from minimaml.tasks.episodes import ClassSplit

PARTS = ("images_background", "images_evaluation")
URLS = {part: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{part}.zip" for part in PARTS}
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718", "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
BYTES = {"images_background": 9_464_212, "images_evaluation": 6_462_886}  # the official zips' sizes
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

    writable = datadir.cache_writable(cache)  # before the work: a folder we cannot write costs a warning only
    images, names = [], []
    for part in PARTS:
        part_images, part_names = _read_part(sources[part], part, counts)
        images.append(part_images)
        names += part_names
    characters = ClassSplit(np.concatenate(images), np.array(names))
    if writable:
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
    """Fetch the official zips that are missing from ``<data>/omniglot/``; the folder.

    Each is resumable and md5-checked (``download.fetch``); a failure raises ``download.DownloadError``
    (a ``DataError``) naming the URL and the folder to put the file in by hand.
    """
    root = datadir.dataset_dir("omniglot", data_dir)
    for part in PARTS:
        if not (root / part).is_dir():
            download.fetch(URLS[part], root, f"{part}.zip", MD5[part], size=BYTES[part], transfer=fetch_url)
    return root


def fetch_url(url: str, dest: Path, **limits) -> None:
    """Move ``url``'s bytes into ``dest``, a ``.part`` file continued if present, within ``limits`` (the
    size and the deadline of ``download.http_transfer``; tests replace this)."""
    download.http_transfer(url, dest, **limits)


def _source(root: Path, part: str) -> Path:
    """The zip of ``part`` if present, else its extracted folder."""
    for path in (root / f"{part}.zip", root / part):
        if path.exists():
            return path
    raise DataError(
        f"{root}: found neither {part}.zip nor the folder {part}/; expected the official Omniglot files "
        f"(see docs/data.md), or fetch them with `python -m minimaml.experiments.omniglot --download` "
        f"(download=True in load_omniglot)"
    )


def _source_stats(path: Path) -> list:
    if path.is_file():
        return datadir.file_stat(path)
    return sorted([str(p.relative_to(path)), *datadir.file_stat(p)[1:]] for p in path.rglob("*.png"))


def _members(source: Path, part: str) -> dict[str, bytes]:
    """``{"<part>/<Alphabet>/<character>/<file>.png": bytes}`` for every PNG of a zip or folder (~15 MB).
    Other files (e.g. a README.txt) are ignored with a warning that names them (``_warn_ignored``)."""
    members, ignored = {}, []
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            name = f"{part}/{path.relative_to(source).as_posix()}"
            if _is_metadata(name):
                continue
            if path.is_dir():
                if name.endswith(".png"):
                    raise DataError(f"{source}: {name} is a directory, not a PNG file")
            elif name.endswith(".png"):
                members[name] = path.read_bytes()
            else:
                ignored.append(name)
        _warn_ignored(source, ignored)
        return members
    try:
        with zipfile.ZipFile(source) as archive:
            for name in archive.namelist():
                if name.endswith("/") or _is_metadata(name):  # folder entries, macOS metadata
                    continue
                if not name.endswith(".png"):
                    ignored.append(name)
                    continue
                try:
                    members[name] = archive.read(name)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise DataError(f"{source}: member {name} is corrupt (damaged zip?): {err}") from err
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{source}: not a readable zip archive (truncated or corrupt download?): {err}") from err
    _warn_ignored(source, ignored)
    return members


def _is_metadata(name: str) -> bool:
    """macOS metadata (``__MACOSX/``, ``._*``) or another hidden file: skipped without a word."""
    return "__MACOSX" in name or name.rsplit("/", 1)[-1].startswith(".")


def _warn_ignored(source: Path, ignored: list) -> None:
    """Warn about the files of a part that are not ``.png`` drawings (they are left out)."""
    if ignored:
        listed = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        warnings.warn(f"{source}: ignored {len(ignored)} file(s) that are not .png drawings: {listed}",
                      stacklevel=4)


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
    """A PNG's bytes -> (28, 28) uint8, Lanczos-resized in grey, inverted (255 = stroke). Another image
    format under the ``.png`` name (e.g. a JPEG) is refused."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise DataError(f"{where}: is a {image.format} image, not a PNG; expected the official PNG drawings")
        image.load()
    except Image.UnidentifiedImageError as err:  # its message shows the in-memory buffer, not the member
        raise DataError(f"{where}: not a readable PNG image: not in an image format Pillow recognises") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: not a readable PNG image: {err}") from err
    if image.size != (image_size, image_size):
        raise DataError(f"{where}: image is {image.size[0]}x{image.size[1]}; expected {image_size}x{image_size}")
    # Grey first: Pillow resizes 1-bit images with nearest neighbour, whatever filter is asked for.
    small = image.convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)
