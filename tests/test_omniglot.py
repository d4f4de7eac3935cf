"""Omniglot: the data folders (datadir), preprocessing, splits and rotations, the cache, every bad input.

Fake copies in the official layout are built in tmp_path: 2 + 1 alphabets, 3 + 2 characters, 3 drawings.
"""

import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from minimaml.tasks import datadir, omniglot
from minimaml.tasks.datadir import DataError
from minimaml.tasks.episodes import ClassSplit

FAKE = omniglot.OmniglotCounts(alphabets=(2, 1), characters=(3, 2), drawings=3, image_size=105)
LAYOUT = {  # part -> {alphabet: number of characters}
    "images_background": {"Alpha": 2, "Beta": 1},
    "images_evaluation": {"Gamma": 2},
}


def drawing(index: int, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: white (1) background, a black (0) square placed by ``index``."""
    image = Image.new("1", (size, size), 1)
    corner = 5 + 10 * index
    ImageDraw.Draw(image).rectangle([corner, 5, corner + 40, 45], fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fake_members(part: str) -> dict[str, bytes]:
    """``{member name: PNG bytes}`` of one fake part; drawing d of every character has its square at d."""
    members = {}
    for alphabet, n_chars in LAYOUT[part].items():
        for c in range(1, n_chars + 1):
            for d in range(1, FAKE.drawings + 1):
                members[f"{part}/{alphabet}/character{c:02d}/{c:04d}_{d:02d}.png"] = drawing(d)
    return members


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def fake_omniglot(data: Path, edit=None, as_folders=False) -> Path:
    """Write both parts under ``data/omniglot``; ``edit(members)`` may change the evaluation part."""
    root = data / "omniglot"
    root.mkdir(parents=True)
    for part in omniglot.PARTS:
        members = fake_members(part)
        if edit is not None and part == "images_evaluation":
            edit(members)
        if as_folders:
            for name, payload in members.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(payload)
        else:
            write_zip(root / f"{part}.zip", members)
    return root


def load(tmp_path, **kwargs):
    return omniglot.load_characters(tmp_path / "data", tmp_path / "cache", counts=FAKE, **kwargs)


# --- datadir: where data and caches live, atomic writes -------------------------------------------------


def test_data_and_cache_dirs_resolve_argument_then_env_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMAML_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("MINIMAML_CACHE", str(tmp_path / "env-cache"))
    assert datadir.dataset_dir("omniglot", tmp_path / "arg") == tmp_path / "arg" / "omniglot"
    assert datadir.dataset_dir("omniglot") == tmp_path / "env-data" / "omniglot"
    assert datadir.cache_root(tmp_path / "c") == tmp_path / "c"
    assert datadir.cache_root() == tmp_path / "env-cache"
    monkeypatch.delenv("MINIMAML_DATA")
    monkeypatch.delenv("MINIMAML_CACHE")
    assert datadir.data_root() == Path("~/.cache/minimaml").expanduser()
    assert datadir.cache_root() == Path("~/.cache/minimaml").expanduser()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def write_half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        datadir.atomic_write(tmp_path / "out.npz", write_half_then_fail)
    assert list(tmp_path.iterdir()) == []
    datadir.save_npz(tmp_path / "out.npz", a=np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
    assert np.array_equal(datadir.load_npz(tmp_path / "out.npz")["a"], np.arange(3))


def test_unreadable_or_mismatched_cache_counts_as_absent(tmp_path):
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    assert datadir.load_npz(tmp_path / "broken.npz") is None
    datadir.save_npz(tmp_path / "ok.npz", images=np.zeros((2, 3)))
    assert datadir.load_npz(tmp_path / "ok.npz", images=(2, 3)) is not None
    assert datadir.load_npz(tmp_path / "ok.npz", images=(2, 4)) is None
    assert datadir.load_npz(tmp_path / "ok.npz", images=(2, 3), names=(2,)) is None


# --- preprocessing ---------------------------------------------------------------------------------------


def test_preprocessing_resizes_and_inverts(tmp_path):
    fake_omniglot(tmp_path / "data")
    characters = load(tmp_path)
    assert characters.images.shape == (5, 3, 28, 28) and characters.images.dtype == np.uint8
    assert list(characters.names) == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Gamma/character01", "Gamma/character02",
    ]
    first = characters.images[0, 0]  # square x 15..55, y 5..45 of 105; Lanczos reaches 3 pixels of 28
    assert first[5:9, 7:11].min() == 255, "strokes must be 255 after inversion"
    assert first[17:, :].max() == 0 and first[:, 18:].max() == 0, "background must be 0"
    grey = Image.open(io.BytesIO(drawing(1))).convert("L").resize((28, 28), Image.LANCZOS)
    assert np.array_equal(first, 255 - np.asarray(grey)), "expected a Lanczos resize of the grey image"
    assert not np.array_equal(characters.images[0, 0], characters.images[0, 1]), "drawings kept in order"


def test_extracted_folders_match_zips_and_macos_metadata_is_ignored(tmp_path):
    fake_omniglot(tmp_path / "zips" / "data", edit=lambda m: m.update({"__MACOSX/images_evaluation/._x.png": b""}))
    fake_omniglot(tmp_path / "dirs" / "data", as_folders=True, edit=lambda m: m.update({
        "images_evaluation/Gamma/character01/._0001_01.png": b"AppleDouble"}))
    from_zips, from_dirs = load(tmp_path / "zips"), load(tmp_path / "dirs")
    assert np.array_equal(from_zips.images, from_dirs.images)
    assert np.array_equal(from_zips.names, from_dirs.names)


def test_cache_is_reused_and_kept_out_of_the_data_dir(tmp_path, monkeypatch):
    root = fake_omniglot(tmp_path / "data")
    before = sorted(p.name for p in root.rglob("*"))
    first = load(tmp_path)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]
    assert sorted(p.name for p in root.rglob("*")) == before

    def must_not_run(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(omniglot, "_read_part", must_not_run)
    again = load(tmp_path)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.names, again.names)


def test_changed_source_invalidates_the_cache(tmp_path):
    root = fake_omniglot(tmp_path / "data")
    before = load(tmp_path)
    members = fake_members("images_evaluation")
    members["images_evaluation/Gamma/character01/0001_01.png"] = drawing(2)  # now a copy of drawing 02
    write_zip(root / "images_evaluation.zip", members)
    os.utime(root / "images_evaluation.zip", ns=(1, 1))  # a new mtime even if the size did not change
    after = load(tmp_path)
    assert not np.array_equal(before.images[3, 0], after.images[3, 0])
    assert np.array_equal(after.images[3, 0], after.images[3, 1])
    assert len(list((tmp_path / "cache").iterdir())) == 2


# --- splits and rotations --------------------------------------------------------------------------------


def test_split_sizes_rotations_and_names(tmp_path):
    fake_omniglot(tmp_path / "data")
    splits = omniglot.load_omniglot(tmp_path / "data", tmp_path / "cache", n_train=2, n_val=1, counts=FAKE)
    shapes = {name: split.images.shape for name, split in splits.items()}
    assert shapes == {"train": (8, 3, 28, 28, 1), "val": (4, 3, 28, 28, 1), "test": (8, 3, 28, 28, 1)}
    train = splits["train"]
    for r in range(4):
        assert train.names[r].endswith(f"/rot{90 * r}")
        turned = np.rot90(train.images[0, :, :, :, 0], r, axes=(1, 2))
        assert np.array_equal(train.images[r, :, :, :, 0], turned)
    characters = [{n.rsplit("/", 1)[0] for n in split.names} for split in splits.values()]
    assert sum(len(c) for c in characters) == 5 and len(set.union(*characters)) == 5, "splits must be disjoint"


def test_split_is_a_seeded_shuffle():
    names = np.array([f"A/character{i:02d}" for i in range(50)])
    characters = ClassSplit(np.arange(50, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 3), np.uint8), names)
    first = omniglot.split_characters(characters, seed=1, n_train=30, n_val=10, rotations=(0,))
    again = omniglot.split_characters(characters, seed=1, n_train=30, n_val=10, rotations=(0,))
    other = omniglot.split_characters(characters, seed=2, n_train=30, n_val=10, rotations=(0,))
    assert np.array_equal(first["train"].names, again["train"].names)
    assert not np.array_equal(first["train"].names, other["train"].names)
    assert [len(first[s].names) for s in ("train", "val", "test")] == [30, 10, 10]
    assert first["train"].names.tolist() != sorted(first["train"].names.tolist()), "expected a shuffle"


def test_bad_split_arguments(tmp_path):
    characters = ClassSplit(np.zeros((5, 2, 3, 3), np.uint8), np.array(list("abcde")))
    with pytest.raises(ValueError, match="no test characters"):
        omniglot.split_characters(characters, n_train=4, n_val=1)
    with pytest.raises(ValueError, match="rotations"):
        omniglot.split_characters(characters, n_train=2, n_val=1, rotations=(45,))


# --- bad inputs: each is an error naming the file, and no cache is written ---------------------------------


def test_missing_zip(tmp_path):
    root = fake_omniglot(tmp_path / "data")
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="neither images_evaluation.zip nor the folder images_evaluation/"):
        load(tmp_path)


def test_truncated_zip(tmp_path):
    root = fake_omniglot(tmp_path / "data")
    path = root / "images_evaluation.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_evaluation\.zip: not a readable zip archive"):
        load(tmp_path)
    assert not (tmp_path / "cache").exists()


def test_corrupt_zip_member(tmp_path):
    root = fake_omniglot(tmp_path / "data")
    path = root / "images_evaluation.zip"
    data = bytearray(path.read_bytes())
    start = data.index(b"\x89PNG")  # the first member's bytes (stored uncompressed)
    data[start + 40 : start + 60] = bytes(20)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images_evaluation\.zip: member .* is corrupt"):
        load(tmp_path)


def corrupt_png(members):
    members["images_evaluation/Gamma/character02/0002_03.png"] = b"\x89PNG\r\n\x1a\n garbage"


def wrong_size(members):
    members["images_evaluation/Gamma/character02/0002_03.png"] = drawing(1, size=100)


def missing_drawing(members):
    del members["images_evaluation/Gamma/character02/0002_03.png"]


def extra_alphabet(members):
    members["images_evaluation/Delta/character01/0009_01.png"] = drawing(1)


def wrong_depth(members):
    members["images_evaluation/Gamma/0002_04.png"] = drawing(1)


@pytest.mark.parametrize(
    "edit, message",
    [
        (corrupt_png, r"images_evaluation\.zip: images_evaluation/Gamma/character02/0002_03\.png: not a readable PNG"),
        (wrong_size, r"0002_03\.png: image is 100x100; expected 105x105"),
        (missing_drawing, r"images_evaluation/Gamma/character02 has 2 drawings; expected 3"),
        (extra_alphabet, r"found 2 alphabets and 3 characters; expected 1 alphabets and 2 characters"),
        (wrong_depth, r"unexpected file images_evaluation/Gamma/0002_04\.png"),
    ],
)
def test_bad_contents_are_errors_and_write_no_cache(tmp_path, edit, message):
    fake_omniglot(tmp_path / "data", edit=edit)
    with pytest.raises(DataError, match=message):
        load(tmp_path)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_real_counts_are_the_defaults(tmp_path):
    fake_omniglot(tmp_path / "data")
    with pytest.raises(DataError, match="expected 30 alphabets and 964 characters"):
        omniglot.load_characters(tmp_path / "data", tmp_path / "cache")


def jpeg_bytes(size: int = 105) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), 255).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_jpeg_under_a_png_name_is_refused_naming_the_member(tmp_path):
    member = "images_evaluation/Gamma/character02/0002_03.png"
    fake_omniglot(tmp_path / "data", edit=lambda m: m.update({member: jpeg_bytes()}))
    with pytest.raises(DataError, match=rf"images_evaluation\.zip: {member}: is a JPEG image, not a PNG"):
        load(tmp_path)


def test_a_garbage_png_is_named_by_its_member_not_by_a_buffer(tmp_path):
    member = "images_evaluation/Gamma/character02/0002_03.png"
    fake_omniglot(tmp_path / "data", edit=lambda m: m.update({member: b"garbage, no image signature" * 4}))
    with pytest.raises(DataError, match=rf"{member}: not a readable PNG image: not in an image format") as err:
        load(tmp_path)
    assert "BytesIO" not in str(err.value)


@pytest.mark.parametrize("as_folders", [False, True])
def test_a_stray_readme_is_ignored_with_a_warning_naming_it(tmp_path, as_folders):
    plain = load_fake(tmp_path / "plain", as_folders)
    fake_omniglot(tmp_path / "data", as_folders=as_folders, edit=lambda m: m.update({
        "images_evaluation/README.txt": b"repacked by hand", "images_evaluation/Gamma/notes.txt": b"x"}))
    with pytest.warns(UserWarning, match=r"images_evaluation(\.zip)?: ignored 2 file\(s\) that are not \.png "
                                         r"drawings: images_evaluation/(Gamma/notes\.txt, images_evaluation/README"
                                         r"\.txt|README\.txt, images_evaluation/Gamma/notes\.txt)"):
        with_readme = load(tmp_path)
    assert np.array_equal(with_readme.images, plain.images)


def load_fake(base: Path, as_folders: bool) -> ClassSplit:
    fake_omniglot(base / "data", as_folders=as_folders)
    return load(base)


def test_a_folder_named_like_a_drawing_is_named_as_a_directory(tmp_path):
    root = fake_omniglot(tmp_path / "data", as_folders=True)
    path = root / "images_evaluation" / "Gamma" / "character02" / "0002_03.png"
    path.unlink()
    path.mkdir()
    with pytest.raises(DataError, match=r"images_evaluation/Gamma/character02/0002_03\.png is a directory, not a PNG"):
        load(tmp_path)


def test_an_unwritable_cache_folder_warns_before_the_work_and_loads_anyway(tmp_path, monkeypatch):
    fake_omniglot(tmp_path / "data")
    (tmp_path / "cache").mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(datadir.tempfile, "mkstemp", refuse)  # as a read-only folder would
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'cache'}: the cache folder is not writable .*MINIMAML_CACHE"):
        characters = load(tmp_path)
    assert characters.images.shape == (5, 3, 28, 28)
    assert list((tmp_path / "cache").iterdir()) == []


def test_atomic_write_gives_the_users_umask_and_keeps_pid_named_temporaries(tmp_path):
    seen = []
    old = os.umask(0o027)
    try:
        datadir.atomic_write(tmp_path / "out.npz", lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"x")))
    finally:
        os.umask(old)
    assert (tmp_path / "out.npz").stat().st_mode & 0o777 == 0o640  # mkstemp alone gives 0o600
    assert seen[0].startswith(f".out.npz.{os.getpid()}.") and seen[0].endswith(".tmp")


# --- optional download -----------------------------------------------------------------------------------


def fake_server(tmp_path):
    """{url: zip bytes} of the fake parts."""
    served = {}
    for part in omniglot.PARTS:
        write_zip(tmp_path / f"{part}.served", fake_members(part))
        served[omniglot.URLS[part]] = (tmp_path / f"{part}.served").read_bytes()
    return served


def test_download_fetches_checks_md5_and_loads(tmp_path, monkeypatch):
    served = fake_server(tmp_path)
    fetched = []
    monkeypatch.setattr(omniglot, "fetch_url", lambda url, dest, **limits: (fetched.append(url), dest.write_bytes(served[url])))
    md5 = {part: hashlib.md5(served[omniglot.URLS[part]]).hexdigest() for part in omniglot.PARTS}
    monkeypatch.setattr(omniglot, "MD5", md5)
    characters = load(tmp_path, download=True)
    assert characters.images.shape == (5, 3, 28, 28)
    assert sorted(fetched) == sorted(omniglot.URLS.values())
    assert sorted(p.name for p in (tmp_path / "data" / "omniglot").iterdir()) == [
        "images_background.zip", "images_evaluation.zip",
    ]
    load(tmp_path, download=True)
    assert len(fetched) == 2, "present zips are not fetched again"


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    served = fake_server(tmp_path)
    monkeypatch.setattr(omniglot, "fetch_url", lambda url, dest, **limits: dest.write_bytes(served[url]))
    with pytest.raises(DataError, match="downloaded md5 .* expected 68d2efa1b9178cc56df9314c21c6e718"):
        load(tmp_path, download=True)
    assert list((tmp_path / "data" / "omniglot").iterdir()) == []


def test_no_download_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(omniglot, "fetch_url", lambda url, dest, **limits: pytest.fail("fetched without download=True"))
    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    with pytest.raises(DataError, match="download=True"):
        load(tmp_path)


# --- the real data -----------------------------------------------------------------------------------------

REAL = Path(os.environ.get("MINIMAML_DATA", "/nonexistent")) / "omniglot"


@pytest.mark.skipif(not REAL.is_dir(), reason="set MINIMAML_DATA to a folder holding omniglot/")
def test_real_omniglot(tmp_path):
    start = time.perf_counter()
    splits = omniglot.load_omniglot(REAL.parent, cache_dir=tmp_path)  # a fresh cache: preprocess now
    seconds = time.perf_counter() - start
    print(f"\nreal Omniglot preprocessing + split: {seconds:.1f} s")
    assert seconds < 120
    sizes = {name: split.images.shape for name, split in splits.items()}
    assert sizes == {"train": (4400, 20, 28, 28, 1), "val": (400, 20, 28, 28, 1), "test": (1692, 20, 28, 28, 1)}
    characters = omniglot.load_characters(REAL.parent, cache_dir=tmp_path)
    assert characters.images.shape == (1623, 20, 28, 28) and len(set(characters.names)) == 1623
    assert 0.05 < characters.images.mean() / 255 < 0.15, "strokes (255) should cover a small part of each image"
