"""Loading and checking inputs: images, directories, .npy batches, the bundle's preprocessing."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers_runtime import GREY, RGB, png16
from kdedge.runtime.inputs import InputError, check_batch, load_inputs, preprocess, read_image



def grey_image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((8, 8)) * 16).astype(np.uint8)


def test_preprocess_matches_the_training_data_layer() -> None:
    from kdedge.train.data import DatasetInfo
    from kdedge.train.data import preprocess as train_preprocess

    for manifest, raw in ((GREY, grey_image()),
                          (RGB, (np.random.default_rng(1).random((3, 20, 17, 3)) * 255).astype(np.uint8))):
        p = manifest["preprocessing"]
        info = DatasetInfo(name=p["dataset"], num_classes=2, in_channels=len(p["mean"]), input_size=tuple(p["input_size"]),
                           mean=tuple(p["mean"]), std=tuple(p["std"]), scale=p["scale"],
                           channel_order=p["channel_order"], class_names=("a", "b"), resize=p["resize"])
        np.testing.assert_allclose(preprocess(raw, manifest), train_preprocess(raw, info), atol=1e-6)


def test_image_file_directory_and_npy(tmp_path: Path) -> None:
    imgs = [grey_image(i) for i in range(3)]
    for i, a in enumerate(imgs):
        Image.fromarray(a, "L").save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    one = load_inputs(tmp_path / "1.png", GREY)
    assert one.x.shape == (1, 1, 8, 8) and one.names == ("1.png",) and one.x.dtype == np.float32
    np.testing.assert_allclose(one.x, preprocess(imgs[1], GREY))
    d = load_inputs(tmp_path, GREY)
    assert d.names == ("0.png", "1.png", "2.png") and len(d) == 3
    np.testing.assert_allclose(d.x[1], one.x[0])
    np.save(tmp_path / "raw.npy", np.stack(imgs))
    raw = load_inputs(tmp_path / "raw.npy", GREY)
    np.testing.assert_allclose(raw.x, d.x)
    assert raw.names[2] == "raw.npy[2]"
    np.save(tmp_path / "prep.npy", d.x)
    np.testing.assert_array_equal(load_inputs(tmp_path / "prep.npy", GREY).x, d.x)
    np.save(tmp_path / "one.npy", d.x[0])  # [C, H, W] is one sample
    assert load_inputs(tmp_path / "one.npy", GREY).x.shape == (1, 1, 8, 8)


def test_grey_stored_as_rgb_is_accepted_and_rgb_model_resizes(tmp_path: Path) -> None:
    a = grey_image()
    Image.fromarray(np.repeat(a[:, :, None], 3, axis=2), "RGB").save(tmp_path / "g.png")
    np.testing.assert_allclose(load_inputs(tmp_path / "g.png", GREY).x, preprocess(a, GREY))
    Image.fromarray(a * 10, "L").resize((30, 20)).save(tmp_path / "big.png")
    x = load_inputs(tmp_path / "big.png", RGB).x  # grey expanded to RGB, resized to 14, cropped to 12
    assert x.shape == (1, 3, 12, 12)
    assert read_image(tmp_path / "big.png", "RGB").shape == (20, 30, 3)


@pytest.mark.parametrize("make, needle", [
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 1, 8, 8), np.float64)), "dtype float64"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 1, 8, 8), np.int64)), "dtype int64"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 3, 8, 8), np.float32)), "3 channel"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 1, 7, 8), np.float32)), "size 7x8"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 8), np.float32)), "shape \\[2, 8\\]"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 8, 8, 3), np.uint8)), "3 channel"),
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 9, 9), np.uint8)), "size 9x9"),
    (lambda p: np.save(p / "bad.npy", np.array([[np.inf]], np.float32).repeat(64).reshape(1, 1, 8, 8)), "NaN or infinite"),
    (lambda p: np.save(p / "bad.npy", np.array([{"a": 1}], dtype=object)), "object arrays are refused"),
    (lambda p: (p / "bad.npy").write_bytes(b"not numpy"), "not a valid .npy"),
    (lambda p: (p / "bad.png").write_bytes(b"\x89PNG garbage"), "cannot read image"),
    (lambda p: (p / "bad.png").write_bytes(b""), r"bad.png: it is empty or in no format Pillow knows \(PNG, JPEG"),
    (lambda p: Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8), "RGB").save(p / "bad.png"),
     "colour image"),
    (lambda p: Image.fromarray(np.zeros((9, 8), np.uint8), "L").save(p / "bad.png"), "size 9x8"),
    (lambda p: (p / "bad.png").write_bytes(png16(np.full((8, 8, 3), 200, np.uint16), "RGB")), "a 16-bit RGB PNG"),
    (lambda p: (p / "bad.png").write_bytes(png16(np.full((8, 8, 2), 200, np.uint16), "LA")),
     "a 16-bit greyscale\\+alpha PNG"),
    (lambda p: Image.fromarray(np.full((8, 8), 300, np.uint16)).save(p / "bad.png"), "a 16-bit greyscale PNG"),
    (lambda p: (p / "bad.txt").write_text("hi"), "unknown input type"),
    (lambda p: (p / "bad").mkdir(), "holds no image files"),
])
def test_bad_inputs_name_the_problem(tmp_path: Path, make, needle: str) -> None:
    make(tmp_path)
    target = next(p for p in tmp_path.iterdir() if p.name.startswith("bad"))
    with pytest.raises(InputError, match=needle) as info:
        load_inputs(target, GREY)
    assert "\n" not in str(info.value)


def test_missing_path_and_check_batch() -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_inputs("/nonexistent/x.png", GREY)
    x = np.zeros((2, 1, 8, 8), np.float32)[:, :, ::-1]  # not contiguous
    assert check_batch(x, (1, 8, 8)).flags.c_contiguous
    with pytest.raises(InputError, match="N >= 1"):
        check_batch(np.zeros((0, 1, 8, 8), np.float32), (1, 8, 8))


def test_preprocess_bad_dtype_and_crop() -> None:
    with pytest.raises(InputError, match="uint8"):
        preprocess(np.zeros((8, 8), np.float32), GREY)
    m = copy.deepcopy(RGB)
    m["preprocessing"]["resize"] = 10  # crop 12 does not fit in 10
    with pytest.raises(InputError, match="does not fit"):
        preprocess(np.zeros((20, 20, 3), np.uint8), m)
