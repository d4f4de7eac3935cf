"""miniimagenet_assemble: a tiny fake ImageNet source, built in tmp_path from a few real images of the
mini-ImageNet sample (copied), with tiny CSVs: 2 train classes, 1 val, 1 test, 3 images each."""

import csv
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimaml.tasks import miniimagenet, miniimagenet_assemble
from minimaml.tasks.datadir import DataError

SAMPLE = Path(os.environ.get("MINIMAML_DATA", "/nonexistent")) / "miniimagenet-sample"
pytestmark = pytest.mark.skipif(not (SAMPLE / "images").is_dir(),
                                reason="set MINIMAML_DATA to a folder holding miniimagenet-sample/")
CLASSES = {"train": 2, "val": 1, "test": 1}
PER_CLASS = 3


def tiny_csvs(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """Write {split}.csv with the first classes and images of the sample's CSVs; the rows per split."""
    folder.mkdir(parents=True)
    rows = {}
    for split, n_classes in CLASSES.items():
        with open(SAMPLE / f"{split}.csv", newline="") as f:
            table = list(csv.reader(f))[1:]
        labels = list(dict.fromkeys(label for _, label in table))[:n_classes]
        rows[split] = [(name, label) for label in labels for name in [n for n, l in table if l == label][:PER_CLASS]]
        with open(folder / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["filename", "label"], *rows[split]])
    return rows


def sample_sums() -> dict[str, str]:
    return {name: digest for digest, name in
            (line.split() for line in (SAMPLE / "SHA256SUMS.images").read_text().splitlines() if line.strip())}


def all_rows(rows):
    return [row for split in rows.values() for row in split]


def test_files_by_name_in_wnid_folders(tmp_path):
    rows = tiny_csvs(tmp_path / "csv")
    for name, label in all_rows(rows):
        (tmp_path / "source" / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / "images" / name, tmp_path / "source" / label / name)
    out = tmp_path / "data" / "miniimagenet"
    counts = miniimagenet_assemble.assemble(tmp_path / "source", out, tmp_path / "csv")
    assert counts == {"images": 12, "resized": 0}

    sums = sample_sums()
    written = dict(line.split()[::-1] for line in (out / "SHA256SUMS.images").read_text().splitlines())
    assert written == {name: sums[name] for name, _ in all_rows(rows)}, "copied byte for byte, checksums recorded"
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        assert (out / name).read_bytes() == (tmp_path / "csv" / name).read_bytes()

    train = miniimagenet.load_miniimagenet("train", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    assert train.images.shape == (2, PER_CLASS, 84, 84, 3)
    first = np.asarray(Image.open(SAMPLE / "images" / rows["train"][0][0]).convert("RGB"))
    np.testing.assert_array_equal(train.images[0, 0], first)


def test_imagenet_names_flat_are_taken_by_index_in_numeric_order(tmp_path):
    rows = tiny_csvs(tmp_path / "csv")
    decoy = tmp_path / "decoy.JPEG"
    Image.new("RGB", (84, 84), (255, 0, 0)).save(decoy)
    (tmp_path / "source").mkdir()
    for split in rows.values():
        for label in dict.fromkeys(label for _, label in split):
            names = {int(name[9:17]): name for name, l in split if l == label}  # CSV index -> file
            for position in range(1, max(names) + 1):
                # ImageNet numbers 5, 10, 15, ...: sorted as text ("10" < "5") the order would differ
                target = tmp_path / "source" / f"{label}_{5 * position}.JPEG"
                shutil.copyfile(SAMPLE / "images" / names[position] if position in names else decoy, target)
    out = tmp_path / "out"
    miniimagenet_assemble.assemble(tmp_path / "source", out, tmp_path / "csv")
    for name, _ in all_rows(rows):
        assert (out / "images" / name).read_bytes() == (SAMPLE / "images" / name).read_bytes(), name


def test_missing_files_are_named_and_nothing_is_written(tmp_path):
    rows = tiny_csvs(tmp_path / "csv")
    (tmp_path / "source").mkdir()
    for name, _ in all_rows(rows)[2:]:  # the first two train images are missing
        shutil.copyfile(SAMPLE / "images" / name, tmp_path / "source" / name)
    first, second = (name for name, _ in rows["train"][:2])
    with pytest.raises(DataError, match=rf"2 of 12 images .* not found: {first} \(train.csv row 2\), "
                                        rf"{second} \(train.csv row 3\);"):
        miniimagenet_assemble.assemble(tmp_path / "source", tmp_path / "out", tmp_path / "csv")
    assert not (tmp_path / "out").exists()


def test_command_line_resize(tmp_path, capsys):
    rows = tiny_csvs(tmp_path / "csv")
    (tmp_path / "source").mkdir()
    for name, _ in all_rows(rows):
        shutil.copyfile(SAMPLE / "images" / name, tmp_path / "source" / name)
    big = rows["val"][0][0]
    Image.open(SAMPLE / "images" / big).resize((120, 100)).convert("L").save(tmp_path / "source" / big, format="PNG")
    miniimagenet_assemble.main([str(tmp_path / "source"), "--out", str(tmp_path / "out"),
                                "--csv-dir", str(tmp_path / "csv"), "--resize"])
    assert "wrote 12 images (1 re-encoded at 84x84)" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "images" / big) as image:
        assert (image.size, image.mode, image.format) == ((84, 84), "RGB", "JPEG")
    other = rows["val"][1][0]
    assert (tmp_path / "out" / "images" / other).read_bytes() == (SAMPLE / "images" / other).read_bytes()


def test_command_line_error_names_the_source(tmp_path, capsys):
    tiny_csvs(tmp_path / "csv")
    with pytest.raises(SystemExit):
        miniimagenet_assemble.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"),
                                    "--csv-dir", str(tmp_path / "csv")])
    assert f"{tmp_path / 'nowhere'}: source folder not found" in capsys.readouterr().err


def test_a_class_in_two_splits_is_refused_before_anything_is_written(tmp_path):
    rows = tiny_csvs(tmp_path / "csv")
    label = rows["train"][0][1]
    name = rows["train"][0][0]
    with open(tmp_path / "csv" / "val.csv", "a", newline="") as f:
        csv.writer(f).writerow([name, label])
    (tmp_path / "source").mkdir()
    with pytest.raises(DataError, match=rf"class {label} is in both the (train|val) and the (val|train) split"):
        miniimagenet_assemble.assemble(tmp_path / "source", tmp_path / "out", tmp_path / "csv")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resize", [False, True])
def test_a_file_that_is_not_an_image_is_refused_and_no_partial_folder_is_left(tmp_path, resize):
    """The audit's cases: a non-image was copied as it was, and with --resize it stopped midway, leaving
    a partial folder. Every source is checked first."""
    rows = tiny_csvs(tmp_path / "csv")
    (tmp_path / "source").mkdir()
    for name, _ in all_rows(rows):
        shutil.copyfile(SAMPLE / "images" / name, tmp_path / "source" / name)
    bad = rows["test"][-1][0]
    (tmp_path / "source" / bad).write_text("not a picture")
    with pytest.raises(DataError, match=rf"{bad} \(test.csv row 4\): not an image Pillow can read"):
        miniimagenet_assemble.assemble(tmp_path / "source", tmp_path / "out", tmp_path / "csv", resize=resize)
    assert not (tmp_path / "out").exists()
