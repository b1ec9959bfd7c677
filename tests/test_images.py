"""Images as tables: folders of PNG/JPEG files and .npy arrays, any size, nothing downloaded and nothing unpickled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from consortium.data.images import (
    SHAPES,
    load_image_array,
    load_image_folder,
    synthetic_images,
    write_image_folder,
)
from consortium.errors import ConfigError, DataError


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    """Two classes, sizes that differ from each other and from the target, PNG and JPEG, a stray non-image file."""
    root = tmp_path / "images"
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    _save(root / "zebra" / "b.png", red, "RGB")
    _save(root / "zebra" / "a.PNG", np.full((7, 7, 3), 255, np.uint8), "RGB")  # white; upper-case suffix
    _save(root / "apple" / "only.jpg", np.full((40, 30), 128, np.uint8), "L")  # grayscale JPEG
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


def test_a_folder_becomes_a_table_of_resized_images_with_sorted_classes(folder):
    t = load_image_folder(folder, size=(4, 6))
    assert t.classes == ("apple", "zebra")  # sorted by name, not by creation
    assert t.image_shape == (3, 4, 6) and t.X.shape == (3, 72) and t.X.dtype == np.float32
    assert t.y.tolist() == [0, 1, 1]  # apple/only.jpg, zebra/a.PNG, zebra/b.png (name order)
    images = t.X.reshape(3, 3, 4, 6)  # channel first
    assert np.allclose(images[0], 128 / 255, atol=2 / 255)  # gray JPEG read as RGB
    assert np.allclose(images[1], 1.0)  # white
    assert np.allclose(images[2][0], 1.0) and np.allclose(images[2][1:], 0.0)  # red: only channel 0
    assert t.feature_names[:2] == ("R_0_0", "R_0_1") and t.feature_names[-1] == "B_3_5"
    assert 0.0 <= t.X.min() and t.X.max() <= 1.0


def test_grayscale_mode_gives_one_channel_and_a_square_size_from_one_int(folder):
    t = load_image_folder(folder, size=5, mode="L")
    assert t.image_shape == (1, 5, 5) and t.X.shape == (3, 25)
    assert np.allclose(t.X[1], 1.0) and np.allclose(t.X[2], 0.299, atol=0.01)  # white; pure red's luma


def test_resizing_is_bilinear_from_any_size(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    _save(tmp_path / "r" / "c" / "g.png", gradient, "L")
    t = load_image_folder(tmp_path / "r", size=(12, 16), mode="L")
    expected = np.asarray(Image.fromarray(gradient).resize((16, 12), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(t.X.reshape(12, 16), expected)
    assert np.all(np.diff(t.X.reshape(12, 16), axis=1) > 0)  # still a left-to-right ramp


def test_named_classes_fix_the_index_even_where_a_site_lacks_a_class(folder):
    t = load_image_folder(folder, size=4, classes=["zebra", "mango", "apple"])
    assert t.classes == ("zebra", "mango", "apple")
    assert sorted(t.y.tolist()) == [0, 0, 2]
    with pytest.raises(DataError, match=r"folder .*apple is not one of the classes \['zebra'\]"):
        load_image_folder(folder, size=4, classes=["zebra"])


def test_folder_errors_name_the_path_and_the_fix(tmp_path, folder):
    with pytest.raises(DataError, match=r"image folder .*missing does not exist: give the folder"):
        load_image_folder(tmp_path / "missing", size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no class folder: put each class's images in"):
        load_image_folder(tmp_path / "empty", size=4)
    (folder / "kiwi").mkdir()
    (folder / "kiwi" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*kiwi holds no PNG or JPEG image: add its images"):
        load_image_folder(folder, size=4)
    (folder / "kiwi" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"cannot read image .*kiwi/broken.png .*replace the file") as caught:
        load_image_folder(folder, size=4)
    assert "\n" not in str(caught.value)
    _save(folder / "loose.png", np.zeros((3, 3), np.uint8), "L")
    with pytest.raises(DataError, match=r"image .*loose.png lies directly in .*: move each image into a sub-folder"):
        load_image_folder(folder, size=4)


def test_a_truncated_jpeg_is_refused_naming_it(tmp_path):
    path = _save(tmp_path / "r" / "c" / "cut.jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8), "RGB")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cannot read image .*cut.jpg"):
        load_image_folder(tmp_path / "r", size=8)


def test_bad_arguments_are_refused(folder):
    with pytest.raises(ConfigError, match="image mode 'CMYK'"):
        load_image_folder(folder, size=4, mode="CMYK")
    for size in (0, (4,), (4, -1), (2.5, 3)):
        with pytest.raises(ConfigError, match="image size must be"):
            load_image_folder(folder, size=size)
    with pytest.raises(ConfigError, match="image layout 'HWC'"):
        load_image_array(np.zeros((2, 4, 4)), np.zeros(2, np.int64), layout="HWC")


# -- arrays ----------------------------------------------------------------------------------------


def test_npy_arrays_in_each_layout_give_the_same_channel_first_table(tmp_path):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 0])
    np.save(tmp_path / "nchw.npy", nchw)
    np.save(tmp_path / "nhwc.npy", nchw.transpose(0, 2, 3, 1))
    np.save(tmp_path / "y.npy", labels)
    a = load_image_array(tmp_path / "nchw.npy", tmp_path / "y.npy")  # inferred: axis 1 has 3 entries, axis 3 has 6
    b = load_image_array(str(tmp_path / "nhwc.npy"), str(tmp_path / "y.npy"), layout="NHWC")
    for t in (a, b):
        assert t.image_shape == (3, 4, 6) and t.classes == ("0", "1", "2") and t.y.tolist() == labels.tolist()
        np.testing.assert_allclose(t.X, nchw.reshape(5, -1) / 255, rtol=1e-6)
    assert a.feature_names[0] == "c0_0_0"
    gray = load_image_array(rng.random((3, 5, 5)), np.array([0, 1, 1]))  # (N, H, W): one channel, floats kept
    assert gray.image_shape == (1, 5, 5)
    u16 = load_image_array(np.full((1, 2, 2), 65535, np.uint16), np.array([0]))
    assert np.allclose(u16.X, 1.0)


def test_an_ambiguous_layout_must_be_named(tmp_path):
    images = np.zeros((2, 3, 8, 3), np.uint8)  # (N, C, H, W) with W=3, or (N, H, W, C) with H=3?
    with pytest.raises(DataError, match=r"could be \(N, H, W, C\) or \(N, C, H, W\): pass layout='NHWC' or layout='NCHW'"):
        load_image_array(images, np.zeros(2, np.int64))
    assert load_image_array(images, np.zeros(2, np.int64), layout="NCHW").image_shape == (3, 8, 3)
    assert load_image_array(images, np.zeros(2, np.int64), layout="NHWC").image_shape == (3, 3, 8)


def test_string_labels_become_sorted_classes_unless_classes_are_named(tmp_path):
    labels = np.array(["pneumonia", "normal", "covid", "normal"])
    np.save(tmp_path / "labels.npy", labels)
    images = np.zeros((4, 2, 2), np.uint8)
    t = load_image_array(images, tmp_path / "labels.npy")
    assert t.classes == ("covid", "normal", "pneumonia") and t.y.tolist() == [2, 1, 0, 1]
    named = load_image_array(images, labels, classes=["normal", "pneumonia", "covid"])
    assert named.y.tolist() == [1, 0, 2, 0]
    with pytest.raises(DataError, match="holds the label 'covid', which is not one of the classes"):
        load_image_array(images, labels, classes=["normal", "pneumonia"])
    with pytest.raises(DataError, match="holds the label 3 but 2 classes are named"):
        load_image_array(images, np.array([0, 3, 1, 1]), classes=["a", "b"])
    with pytest.raises(DataError, match="integer labels are class indices, 0 or more"):
        load_image_array(images, np.array([0, -1, 1, 1]))
    with pytest.raises(DataError, match="float64 labels"):
        load_image_array(images, np.array([0.5, 1, 1, 1]))


def test_array_errors_name_the_file_and_the_fix(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"x.npy holds 3 images but .*y.npy holds 2 labels: give one label per image"):
        load_image_array(tmp_path / "x.npy", tmp_path / "y.npy")
    with pytest.raises(DataError, match=r"images file .*nope.npy does not exist"):
        load_image_array(tmp_path / "nope.npy", tmp_path / "y.npy")
    np.save(tmp_path / "flat.npy", np.zeros((3, 16)))
    with pytest.raises(DataError, match=r"flat.npy has shape \(3, 16\): images must be"):
        load_image_array(tmp_path / "flat.npy", np.zeros(3, np.int64))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"junk.npy is not a .npy array"):
        load_image_array(tmp_path / "junk.npy", np.zeros(3, np.int64))
    bad = np.zeros((3, 2, 2), np.float32)
    bad[1, 0, 1] = np.nan
    with pytest.raises(DataError, match="NaN or infinite value in image 1"):
        load_image_array(bad, np.zeros(3, np.int64))
    np.savez(tmp_path / "both.npz", x=np.zeros((3, 2, 2)))
    with pytest.raises(DataError, match=r"is an .npz archive"):
        load_image_array(tmp_path / "both.npz", np.zeros(3, np.int64))


def test_pickled_object_arrays_are_refused_never_unpickled(tmp_path):
    objects = np.empty(2, dtype=object)
    objects[:] = [np.zeros((2, 2)), "payload"]
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    np.save(tmp_path / "labels.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError, match=r"images file .*objects.npy cannot be read without unpickling .*allow_pickle=False"):
        load_image_array(tmp_path / "objects.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"labels file .*labels.npy cannot be read without unpickling"):
        load_image_array(tmp_path / "x.npy", tmp_path / "labels.npy")
    with pytest.raises(DataError, match="holds Python objects"):
        load_image_array(objects, np.zeros(2, np.int64))


# -- generated images --------------------------------------------------------------------------------


def test_synthetic_images_are_reproducible_balanced_and_round_trip_through_a_folder(tmp_path):
    t = synthetic_images(40, size=16, n_classes=4, seed=3)
    assert t.image_shape == (3, 16, 16) and t.classes == SHAPES[:4]
    assert np.bincount(t.y).tolist() == [10, 10, 10, 10]
    assert np.array_equal(t.X, synthetic_images(40, size=16, n_classes=4, seed=3).X)
    assert not np.array_equal(t.X, synthetic_images(40, size=16, n_classes=4, seed=4).X)
    assert 0.0 <= t.X.min() and t.X.max() <= 1.0
    paths = write_image_folder(t, tmp_path / "set")
    assert len(paths) == 40 and all(p.parent.name == t.classes[k] for p, k in zip(paths, t.y))
    back = load_image_folder(tmp_path / "set", size=16, classes=t.classes)
    order = sorted(range(40), key=lambda i: (t.y[i], paths[i].name))  # read class by class, in name order
    assert back.y.tolist() == t.y[order].tolist()
    np.testing.assert_allclose(back.X, t.X[order], atol=0.5 / 255 + 1e-6)  # 8-bit PNG rounding
    gray = synthetic_images(6, size=8, n_classes=2, channels=1, seed=0)
    assert gray.image_shape == (1, 8, 8)
    with pytest.raises(ConfigError, match="synthetic_images needs"):
        synthetic_images(10, n_classes=11)


def test_synthetic_shapes_defeat_a_linear_model_but_not_a_small_cnn():
    """The generated task is worth a CNN: pixels-linear stays near chance, a few epochs of the example CNN do not."""
    import warnings
    import importlib.util
    from pathlib import Path

    import torch
    from sklearn.linear_model import LogisticRegression

    train, test = synthetic_images(1600, size=16, n_classes=4, seed=0), synthetic_images(400, size=16, n_classes=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs stops early: it has no signal to converge to
        linear = LogisticRegression(max_iter=100, tol=1e-3).fit(train.X, train.y).score(test.X, test.y)
    spec = importlib.util.spec_from_file_location("cnn32", Path(__file__).parents[1] / "examples" / "images" / "cnn32.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.group_norm_cnn(in_channels=3, n_classes=4, width=16)
    X, y = torch.from_numpy(train.X).view(-1, 3, 16, 16), torch.from_numpy(train.y)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(6):
        for idx in torch.randperm(len(X)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        cnn = float((model(torch.from_numpy(test.X).view(-1, 3, 16, 16)).argmax(1) == torch.from_numpy(test.y)).float().mean())
    assert linear < 0.4 and cnn > 0.65, (linear, cnn)  # chance: 0.25


def test_a_16_bit_grayscale_png_keeps_its_depth_instead_of_saturating(tmp_path):
    deep = np.array([[0, 1000, 30000, 65535]] * 2, dtype=np.uint16)  # as "L" everything above 255 would be white
    (tmp_path / "r" / "scan").mkdir(parents=True)
    Image.fromarray(deep).save(tmp_path / "r" / "scan" / "x.png")  # mode I;16
    gray = load_image_folder(tmp_path / "r", size=(2, 4), mode="L")
    np.testing.assert_allclose(gray.X.reshape(2, 4), deep / 65535, rtol=1e-6)
    rgb = load_image_folder(tmp_path / "r", size=(2, 4))
    np.testing.assert_allclose(rgb.X.reshape(3, 2, 4), np.stack([deep / 65535] * 3), rtol=1e-6)
