"""mini-ImageNet: the Ravi & Larochelle layout, the cache, and every bad input, on fake copies in tmp_path."""

import os
import shutil
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
    """``sample=True`` reads ``miniimagenet-sample``, and only then: with both folders present (2 and 4
    images per class) each load gets its own folder's images, decoded, and its own cache."""
    fake_miniimagenet(tmp_path / "data", name="miniimagenet-sample", per_class=2)
    fake_miniimagenet(tmp_path / "data", per_class=4)
    for sample, per_class in ((True, 2), (False, 4), (True, 2)):  # the last one from the cache
        split = load(tmp_path, sample=sample)
        assert split.images.shape == (3, per_class, 84, 84, 3) and split.names.tolist() == list(CLASSES)
        assert np.allclose(split.images.reshape(3, -1, 3).mean(axis=1), COLOURS, atol=3)
    caches = sorted(p.name.split("-train-")[0] for p in (tmp_path / "cache").glob("*.npz"))
    assert caches == ["miniimagenet", "miniimagenet-sample"]


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


# --- labels, splits, checksums, messages, the cache folder -------------------------------------------------


def test_label_disagreeing_with_the_files_wordnet_id_names_file_row_and_both_ids(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    table = root / "train.csv"
    table.write_text(table.read_text().replace(f"{CLASSES[0]}00000001.jpg,{CLASSES[0]}",
                                               f"{CLASSES[0]}00000001.jpg,{CLASSES[1]}"))
    with pytest.raises(DataError, match=rf"train\.csv: row 3: label {CLASSES[1]} disagrees with the WordNet id "
                                        rf"{CLASSES[0]} of its file {CLASSES[0]}00000001\.jpg"):
        load(tmp_path)


def test_file_name_without_a_wordnet_id_is_refused(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    with open(root / "train.csv", "a") as f:
        f.write(f"photo.jpg,{CLASSES[0]}\n")
    with pytest.raises(DataError, match=r"row 14: file photo\.jpg does not start with a WordNet id"):
        load(tmp_path)


def test_a_class_in_two_splits_is_refused(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    train_rows = (root / "train.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(["filename,label"] + train_rows[9:13]) + "\n")  # class 3, copied
    for split, other in (("train", "val"), ("val", "train")):
        with pytest.raises(DataError, match=rf"{split}\.csv and .*{other}\.csv: class {CLASSES[2]} is in both the "
                                            rf"{split} and the {other} split; the splits must be disjoint"):
            miniimagenet.load_miniimagenet(split, tmp_path / "data", tmp_path / "cache")


def test_a_directory_in_place_of_an_image_is_named_as_a_directory(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    path = root / "images" / f"{CLASSES[1]}00000003.jpg"
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=rf"row 9 names {path.name}, but .* is a directory, not a file"):
        load(tmp_path)


def test_unidentifiable_image_message_says_what_is_wrong(tmp_path):
    root = fake_miniimagenet(tmp_path / "data")
    (root / "images" / f"{CLASSES[0]}00000000.jpg").write_bytes(b"not an image at all" * 10)
    with pytest.raises(DataError, match=r"row 2\): not a readable image: not in an image format") as err:
        load(tmp_path)
    assert "BytesIO" not in str(err.value)


def test_cache_files_get_the_users_umask(tmp_path):
    fake_miniimagenet(tmp_path / "data")
    old = os.umask(0o022)
    try:
        load(tmp_path)
    finally:
        os.umask(old)
    (cache,) = (tmp_path / "cache").iterdir()
    assert cache.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0o600


def test_an_unwritable_cache_folder_warns_before_the_work_and_loads_anyway(tmp_path, monkeypatch):
    fake_miniimagenet(tmp_path / "data")
    (tmp_path / "cache").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(miniimagenet.datadir.tempfile, "mkstemp", refuse)  # as a read-only folder would
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'cache'}: the cache folder is not writable .*MINIMAML_CACHE"):
        split = load(tmp_path)
    assert split.images.shape == (3, 4, 84, 84, 3)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_warns_and_loads_anyway(tmp_path):
    fake_miniimagenet(tmp_path / "data")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o555)
    try:
        with pytest.warns(UserWarning, match="cache folder is not writable"):
            assert load(tmp_path).images.shape == (3, 4, 84, 84, 3)
    finally:
        (tmp_path / "cache").chmod(0o755)


def sample_copy(tmp_path, n_classes=2, per_class=3) -> Path:
    """A few real images of the sample, their train.csv rows and SHA256SUMS.images, copied to tmp_path."""
    root = tmp_path / "data" / "miniimagenet-sample"
    (root / "images").mkdir(parents=True)
    rows = (REAL / "train.csv").read_text().splitlines()[1:]
    labels = list(dict.fromkeys(row.split(",")[1] for row in rows))[:n_classes]
    chosen = [row for label in labels for row in [r for r in rows if r.endswith("," + label)][:per_class]]
    for row in chosen:
        shutil.copy(REAL / "images" / row.split(",")[0], root / "images")
    (root / "train.csv").write_text("\n".join(["filename,label"] + chosen) + "\n")
    shutil.copy(REAL / miniimagenet.CHECKSUMS, root)
    return root


needs_sample = pytest.mark.skipif(not REAL.is_dir(),
                                  reason="set MINIMAML_DATA to a folder holding miniimagenet-sample/")


@needs_sample
def test_a_corrupted_image_is_refused_by_its_checksum(tmp_path):
    root = sample_copy(tmp_path)
    path = sorted((root / "images").iterdir())[4]
    data = bytearray(path.read_bytes())
    data[1000:1200] = bytes(b ^ 0xFF for b in data[1000:1200])  # 200 bytes flipped: may well still decode
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path.name} \(.*train\.csv, row 6\): sha256 [0-9a-f]{{64}} does not "
                                        rf"match [0-9a-f]{{64}} in .*SHA256SUMS\.images"):
        load(tmp_path, sample=True)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").glob("*.npz")) == []


@needs_sample
def test_an_image_missing_from_the_checksum_file_is_refused(tmp_path):
    root = sample_copy(tmp_path)
    name = sorted((root / "images").iterdir())[0].name
    sums = root / miniimagenet.CHECKSUMS
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if not line.endswith(name)))
    with pytest.raises(DataError, match=rf"train\.csv: row 2 names {name}, which .*SHA256SUMS\.images does not list"):
        load(tmp_path, sample=True)


@needs_sample
def test_a_bit_flip_that_keeps_size_and_mtime_is_caught_when_the_cache_is_rebuilt(tmp_path, monkeypatch):
    """The audit's case: every rebuild of the cache hashes every image (no record of earlier checks by
    size and mtime), so a flipped bit with the file's size and mtime put back is refused, not cached."""
    root = sample_copy(tmp_path)
    hashed = []
    real_sha256 = miniimagenet._sha256
    monkeypatch.setattr(miniimagenet, "_sha256", lambda path: (hashed.append(path.name), real_sha256(path))[1])
    images = sorted(p.name for p in (root / "images").iterdir())
    assert load(tmp_path, sample=True).images.shape == (2, 3, 84, 84, 3)
    assert sorted(name for name in hashed if name.endswith(".jpg")) == images
    path = root / "images" / images[2]
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for npz in (tmp_path / "cache").glob("*.npz"):
        npz.unlink()  # a rebuild: the cache is gone (or another version of the code keys it differently)
    with pytest.raises(DataError, match=rf"{images[2]} \(.*\): sha256 [0-9a-f]{{64}} does not match"):
        load(tmp_path, sample=True)
    assert list((tmp_path / "cache").glob("*.npz")) == []
