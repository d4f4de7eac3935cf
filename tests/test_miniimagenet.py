"""mini-ImageNet: the Ravi & Larochelle layout, the cache, and every bad input, on fake copies in tmp_path."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minimaml.tasks import miniimagenet
from minimaml.tasks.datadir import DataError

CLASSES = ("n01000001", "n01000002", "n01000003")  # 3 classes, 4 images each, one plain colour per class
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def fake_miniimagenet(data: Path, name="miniimagenet", per_class=4, size=84) -> Path:
    """Write ``data/<name>/images/*.jpg`` and a ``train.csv`` listing them; the root folder."""
    root = data / name
    (root / "images").mkdir(parents=True)
    rows = ["filename,label"]
    for wnid, colour in zip(CLASSES, COLOURS):
        for i in range(per_class):
            filename = f"{wnid}{i:08d}.jpg"
            Image.new("RGB", (size, size), colour).save(root / "images" / filename, quality=95)
            rows.append(f"{filename},{wnid}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def load(tmp_path, **kwargs):
    return miniimagenet.load_miniimagenet("train", tmp_path / "data", tmp_path / "cache", **kwargs)


def test_loads_classes_in_csv_order(tmp_path):
    fake_miniimagenet(tmp_path / "data")
    split = load(tmp_path)
    assert split.images.shape == (3, 4, 84, 84, 3) and split.images.dtype == np.uint8
    assert split.names.tolist() == list(CLASSES)
    means = split.images.reshape(3, -1, 3).mean(axis=1)
    assert np.allclose(means, COLOURS, atol=3)


def test_sample_folder(tmp_path):
    fake_miniimagenet(tmp_path / "data", name="miniimagenet-sample")
    assert load(tmp_path, sample=True).images.shape == (3, 4, 84, 84, 3)


def test_other_sizes_and_grey_images_become_84x84_rgb(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    Image.new("RGB", (100, 90), COLOURS[1]).save(root / "images" / f"{CLASSES[1]}00000002.jpg")
    Image.new("L", (84, 84), 128).save(root / "images" / f"{CLASSES[2]}00000000.jpg")
    with pytest.warns(UserWarning, match="1 of 12 images of the train split were not 84x84"):
        split = load(tmp_path)
    assert np.allclose(split.images[1, 2].reshape(-1, 3).mean(axis=0), COLOURS[1], atol=3)
    assert np.allclose(split.images[2, 0], 128, atol=2)


def test_cache_is_reused_and_kept_out_of_the_data_dir(tmp_path, monkeypatch):
    root = fake_miniimagenet(tmp_path / "data")
    before = sorted(p.name for p in root.rglob("*"))
    first = load(tmp_path)
    assert sorted(p.name for p in root.rglob("*")) == before
    assert [p.name.startswith("miniimagenet-train-") for p in (tmp_path / "cache").iterdir()] == [True]
    monkeypatch.setattr(miniimagenet, "_decode", lambda *args: pytest.fail("the cache should have been used"))
    assert np.array_equal(load(tmp_path).images, first.images)


def test_missing_csv(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    (root / "train.csv").unlink()
    with pytest.raises(DataError, match=r"train\.csv: split file not found"):
        load(tmp_path)


def test_bad_header(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    table = root / "train.csv"
    table.write_text("file,class\n" + table.read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match=r"train\.csv: header is \['file', 'class'\]; expected filename,label"):
        load(tmp_path)


def test_bad_row(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    with open(root / "train.csv", "a") as f:
        f.write("lonely.jpg\n")
    with pytest.raises(DataError, match=r"train\.csv: row 14 is \['lonely.jpg'\]; expected two fields"):
        load(tmp_path)


def test_row_naming_a_missing_file(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    (root / "images" / f"{CLASSES[1]}00000003.jpg").unlink()
    with pytest.raises(DataError, match=rf"train\.csv: row 9 names {CLASSES[1]}00000003\.jpg, but .* does not exist"):
        load(tmp_path)


def test_missing_images_folder(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    os.rename(root / "images", root / "elsewhere")
    with pytest.raises(DataError, match=r"images: folder not found"):
        load(tmp_path)


def test_corrupt_jpg_writes_no_cache(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    path = root / "images" / f"{CLASSES[2]}00000001.jpg"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"{path.name} \(.*train\.csv, row 11\): not a readable image"):
        load(tmp_path)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_unequal_class_counts_name_the_class(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=f"class {CLASSES[2]} has 3 images, others have 4"):
        load(tmp_path)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'training'"):
        miniimagenet.load_miniimagenet("training", tmp_path)


REAL = Path(os.environ.get("MINIMAML_DATA", "/nonexistent")) / "miniimagenet-sample"


@pytest.mark.skipif(not REAL.is_dir(), reason="set MINIMAML_DATA to a folder holding miniimagenet-sample/")
def test_real_sample(tmp_path):
    shapes = {}
    for split in miniimagenet.SPLITS:
        data = miniimagenet.load_miniimagenet(split, REAL.parent, cache_dir=tmp_path, sample=True)
        shapes[split] = data.images.shape
        assert all(name.startswith("n") and len(name) == 9 for name in data.names)
        assert 20 < data.images.mean() < 235
    assert shapes == {"train": (64, 12, 84, 84, 3), "val": (16, 12, 84, 84, 3), "test": (20, 12, 84, 84, 3)}
