"""Where datasets and their preprocessed caches live, and how caches are written.

- Data (read-only is fine): the explicit ``data_dir`` argument, else ``$MINIMAML_DATA``, else
  ``~/.cache/minimaml``. Each dataset is a folder below it: ``<data>/omniglot/``, ``<data>/miniimagenet/``.
- Caches (preprocessed ``.npz``): the explicit ``cache_dir`` argument, else ``$MINIMAML_CACHE``, else
  ``~/.cache/minimaml``. Never inside a data folder, which may be read-only.
- Writes are atomic: a temporary file in the target folder, then ``os.replace``; a failure leaves nothing.
  Cache files get the user's umask (as ``minimaml.files.write_atomic``). A cache folder that cannot be
  written is checked before any preprocessing (``cache_writable``): the loaders then run without
  writing the cache, with a warning.
- Caches hold plain arrays only (``np.savez``) and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from minimaml.files import current_umask, process_running

DEFAULT_DIR = Path("~/.cache/minimaml")


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message names the file or folder and what was expected."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_dir``, else ``$MINIMAML_DATA``, else ``~/.cache/minimaml``."""
    chosen = data_dir if data_dir is not None else os.environ.get("MINIMAML_DATA") or DEFAULT_DIR
    return Path(chosen).expanduser()


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder of one dataset, e.g. ``dataset_dir("omniglot")`` -> ``<data>/omniglot``."""
    return data_root(data_dir) / name


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$MINIMAML_CACHE``, else ``~/.cache/minimaml``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get("MINIMAML_CACHE") or DEFAULT_DIR
    return Path(chosen).expanduser()


def fingerprint(*parts) -> str:
    """A short hex digest of JSON-serialisable ``parts`` (source file stats, settings): the cache key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_stat(path: Path) -> list:
    """``[name, size, mtime_ns]`` of a file: changes when the file is replaced or edited."""
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def check_file(path: Path, where: str) -> None:
    """Raise ``DataError`` unless ``path`` is a regular file; ``where`` says who names it (e.g. a CSV row).
    The message says whether the path is missing or is a directory."""
    if path.is_file():
        return
    problem = "is a directory, not a file" if path.is_dir() else "does not exist"
    raise DataError(f"{where}, but {path} {problem}")


def cache_writable(path: Path) -> bool:
    """Whether the cache file ``path`` can be written: a temporary file is made and removed in its folder
    (or, while that does not exist yet, in the nearest folder above it, where it would be created; nothing
    is created here). If not, warn (naming the folder) and return False; the caller then runs without
    writing the cache. Called before the preprocessing, so no work is lost."""
    folder = Path(path).parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=f".{Path(path).name}.{os.getpid()}.", suffix=".tmp")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        warnings.warn(f"{folder}: the cache folder is not writable ({err.strerror or err}); continuing without "
                      f"writing the cache, so this preprocessing will run again next time. Set MINIMAML_CACHE "
                      f"(or pass cache_dir) to a writable folder to keep it", stacklevel=3)
        return False
    return True


def atomic_write(path: Path, write) -> None:
    """Create ``path`` by calling ``write(tmp_path)`` on a temporary file beside it, then renaming it.

    If ``write`` raises, the temporary file is removed and ``path`` is left untouched. The temporary
    file's name carries the writer's pid (``.<name>.<pid>.XXXX.tmp``): those of writers that are no
    longer running (killed mid-write) are removed first, while another live process may be writing.
    The file gets the user's umask (``mkstemp`` alone would leave it readable by its owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_dead_writers_files(path: Path) -> None:
    """Remove the temporary files that ``atomic_write`` left beside ``path`` in processes that died."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        pid = leftover.name[len(path.name) + 2:].split(".")[0]
        if not pid.isdigit() or not process_running(int(pid)):
            leftover.unlink(missing_ok=True)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, atomically. No object arrays (no pickle)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_npz(path: Path, **shapes: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or ``None`` (then the cache is rebuilt) when it is absent, unreadable,
    or lacks an array named in ``shapes`` with that shape, e.g. ``load_npz(path, images=(5, 20, 28, 28))``.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if any(key not in arrays or arrays[key].shape != shape for key, shape in shapes.items()):
        return None
    return arrays
