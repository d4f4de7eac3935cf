"""Assemble mini-ImageNet in the layout ``load_miniimagenet`` reads, from ImageNet JPEGs you supply.

    python -m minimaml.tasks.miniimagenet_assemble SOURCE --out DIR [--csv-dir DIR] [--resize]

mini-ImageNet has no official download. This reads the Ravi & Larochelle CSVs (``--csv-dir``, default
``<data>/miniimagenet``) and looks for every file they name under SOURCE, searched recursively (flat, or
one folder per WordNet id), either

- by its own name (``n0153282900000005.jpg``), as in copies that already use the mini-ImageNet names, or
- among the original ImageNet files ``<wnid>_<number>.JPEG``: the CSV's ``<wnid><index>.jpg`` is then
  the index-th image (from 1) of its class in order of ``<number>``, the convention of the public
  generator yaoyao-liu/mini-imagenet-tools.

Before anything is written, the CSVs must hold disjoint classes, and every file must be found and be an
image Pillow can open; the error names the class, the missing files or the file that is not an image.
A folder ``DIR`` that this command created is removed again if it fails midway (a full disk). Output:
``DIR/{train,val,test}.csv``, ``DIR/images/<filename>`` (copied as they are; with ``--resize``, an image
that is not an 84x84 RGB JPEG is converted to RGB, resized to 84x84 with Lanczos like the loader, and
saved as JPEG quality 95), and ``DIR/SHA256SUMS`` (the CSVs) and ``DIR/SHA256SUMS.images`` (every
image), in ``sha256sum``'s format. The loader resizes other sizes itself, so ``--resize`` is optional:
it makes the folder ~25x smaller for full-size ImageNet images and the first cache build faster.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
from pathlib import Path

from PIL import Image

from minimaml.tasks import datadir
from minimaml.tasks.datadir import DataError
from minimaml.tasks.miniimagenet import SIZE, SPLITS, _check_disjoint, _read_csv

MINI_NAME = re.compile(r"(n\d{8})(\d{8})\.jpg")  # n01532829 00000005 .jpg
IMAGENET_NAME = re.compile(r"(n\d{8})_(\d+)\.jpe?g", re.IGNORECASE)  # n01532829_1234.JPEG
SHOWN = 20  # missing files named in the error


def assemble(source, out, csv_dir=None, resize: bool = False) -> dict:
    """Write ``out`` (CSVs, images/, checksums) from the images under ``source``; returns counts."""
    source, out = Path(source), Path(out)
    csv_dir = Path(csv_dir) if csv_dir is not None else datadir.dataset_dir("miniimagenet")
    if not source.is_dir():
        raise DataError(f"{source}: source folder not found; expected ImageNet JPEGs (flat or in <wnid>/ folders)")
    if out.resolve().is_relative_to(source.resolve()):
        raise DataError(f"{out}: the output folder is inside the source folder {source}; choose another")
    for split in SPLITS:
        _check_disjoint(csv_dir, split, csv_dir / f"{split}.csv", _read_csv(csv_dir / f"{split}.csv"))
    wanted = [(csv_dir / f"{split}.csv", row, filename)
              for split in SPLITS
              for files in _read_csv(csv_dir / f"{split}.csv").values() for row, filename in files]
    found = find_sources(source, [filename for _, _, filename in wanted])
    missing = [(table, row, filename) for table, row, filename in wanted if filename not in found]
    if missing:
        shown = ", ".join(f"{filename} ({table.name} row {row})" for table, row, filename in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise DataError(f"{source}: {len(missing)} of {len(wanted)} images named in the CSVs of {csv_dir} were "
                        f"not found: {shown}{more}; expected each under its own name or as an ImageNet "
                        f"<wnid>_<number>.JPEG (see docs/data.md)")

    for table, row, filename in wanted:
        check_image(found[filename], f"{table.name} row {row}")

    created = not out.exists()
    images = out / "images"
    try:
        images.mkdir(parents=True, exist_ok=True)
        resized = 0
        for _, _, filename in wanted:
            resized += write_image(found[filename], images / filename, resize)
        for split in SPLITS:
            table = csv_dir / f"{split}.csv"
            if table.resolve() != (out / table.name).resolve():
                _write(out / table.name, lambda tmp, table=table: shutil.copyfile(table, tmp))
        write_sums(out / "SHA256SUMS", out, [f"{split}.csv" for split in SPLITS])
        write_sums(out / "SHA256SUMS.images", images, sorted(filename for _, _, filename in wanted))
    except BaseException:
        if created:  # ours alone: no partial folder left behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return {"images": len(wanted), "resized": resized}


def check_image(path: Path, where: str) -> None:
    """Raise ``DataError`` unless Pillow recognises ``path`` as an image (its header: cheap)."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header was parsed
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} ({where}): not an image Pillow can read ({type(err).__name__}); nothing was "
                        f"written") from None


def find_sources(source: Path, names: list[str]) -> dict[str, Path]:
    """``{csv filename: source file}`` for the names that can be found under ``source``."""
    wanted = set(names)
    by_name: dict[str, Path] = {}
    for path in sorted(source.rglob("*")):
        if (path.name in wanted or IMAGENET_NAME.fullmatch(path.name)) and path.is_file():
            if path.name in by_name:
                raise DataError(f"{source}: two files are named {path.name}: {by_name[path.name]} and {path}; "
                                f"keep one")
            by_name[path.name] = path
    by_class: dict[str, list[tuple[int, Path]]] = {}
    for name, path in by_name.items():
        match = IMAGENET_NAME.fullmatch(name)
        if match:
            by_class.setdefault(match.group(1), []).append((int(match.group(2)), path))
    ordered = {wnid: [path for _, path in sorted(files)] for wnid, files in by_class.items()}
    found = {}
    for name in names:
        if name in by_name:
            found[name] = by_name[name]
            continue
        match = MINI_NAME.fullmatch(name)
        if match:
            index, files = int(match.group(2)), ordered.get(match.group(1), [])
            if 1 <= index <= len(files):
                found[name] = files[index - 1]
    return found


def write_image(path: Path, target: Path, resize: bool) -> bool:
    """Copy ``path`` to ``target``, or with ``resize`` re-encode it as an 84x84 RGB JPEG unless it is one;
    whether it was re-encoded."""
    if resize:
        try:
            with Image.open(path) as image:
                if image.size != (SIZE, SIZE) or image.mode != "RGB" or image.format != "JPEG":
                    image.load()
                    small = image.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
                    _write(target, lambda tmp: small.save(tmp, format="JPEG", quality=95))
                    return True
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{path}: not a readable image: {err}") from err
    _write(target, lambda tmp: shutil.copyfile(path, tmp))
    return False


def write_sums(path: Path, folder: Path, names: list[str]) -> None:
    """``<sha256>  <name>`` for each file of ``folder`` named in ``names``."""
    lines = [f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  {name}\n" for name in names]
    _write(path, lambda tmp: tmp.write_text("".join(lines), encoding="utf-8"))


def _write(target: Path, write) -> None:
    """``write(tmp)`` then rename over ``target``: a file is whole or absent."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder of ImageNet JPEGs, flat or in <wnid>/ folders")
    parser.add_argument("--out", required=True, help="the folder to write, e.g. $MINIMAML_DATA/miniimagenet")
    parser.add_argument("--csv-dir", default=None, help="folder of train.csv, val.csv, test.csv "
                        "(default <data>/miniimagenet)")
    parser.add_argument("--resize", action="store_true", help="store every image as an 84x84 RGB JPEG")
    args = parser.parse_args(argv)
    try:
        counts = assemble(args.source, args.out, args.csv_dir, args.resize)
    except DataError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    print(f"wrote {counts['images']} images ({counts['resized']} re-encoded at {SIZE}x{SIZE}), the CSVs and "
          f"SHA256SUMS, SHA256SUMS.images to {args.out}")


if __name__ == "__main__":
    main()
