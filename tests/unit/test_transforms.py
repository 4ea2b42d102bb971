"""Tests for multimodal.transforms: model-card-exact tiling and robust image loading."""

from __future__ import annotations

import concurrent.futures
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from multimodal.transforms import ImageLoadError, ImageTransform, decoded_size, load_image
from tests.helpers.images import make_image, ref_pixel_values, ref_target_ratio


def rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------

TILING_CASES = [
    # (width, height, image_size, max_tiles)
    (1, 1, 448, 12),
    (10, 10, 448, 12),
    (1344, 448, 448, 12),  # 3:1
    (300, 1500, 448, 12),  # 1:5
    pytest.param(4000, 3000, 448, 12, marks=pytest.mark.slow),  # 12 megapixels: seconds on a CPU
    (448, 448, 448, 12),
    (999, 333, 56, 12),
    (57, 400, 56, 6),
    (1000, 700, 56, 40),
    (1500, 700, 448, 1),
    (2, 1000, 56, 12),
]


@pytest.mark.parametrize(("width", "height", "image_size", "max_tiles"), TILING_CASES)
def test_pixel_values_match_model_card(width, height, image_size, max_tiles):
    image = make_image(width, height)
    transform = ImageTransform(image_size=image_size, max_tiles=max_tiles)
    got = transform(image)
    want = ref_pixel_values(image, input_size=image_size, max_num=max_tiles)
    cols, rows = ref_target_ratio(width, height, 1, max_tiles, image_size)
    expected_n = cols * rows + (1 if cols * rows > 1 else 0)
    assert transform.num_tiles(width, height) == expected_n
    assert got.dtype == torch.float32
    assert got.shape == (expected_n, 3, image_size, image_size) == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("width", "height", "max_tiles", "grid"),
    [
        (1, 1, 12, (1, 1)),
        (10, 10, 12, (1, 1)),  # tiny square: ties with 2x2 etc., but its area is too small
        (448, 448, 12, (1, 1)),  # 448^2 is not > 0.5 * 448^2 * 4
        (896, 896, 12, (2, 2)),  # large enough to take the bigger square grid
        (1344, 448, 12, (3, 1)),
        (300, 1500, 12, (1, 5)),
        (4000, 3000, 12, (4, 3)),
        (4000, 3000, 1, (1, 1)),
    ],
)
def test_expected_grids_for_odd_shapes(width, height, max_tiles, grid):
    assert ref_target_ratio(width, height, 1, max_tiles, 448) == grid
    n = grid[0] * grid[1]
    assert ImageTransform(448, max_tiles).num_tiles(width, height) == n + (1 if n > 1 else 0)


def test_tile_counts_match_reference_on_sweep():
    """Grid choice (ties included) of the HF processor equals the model card's, min_patches 1."""
    rng = np.random.default_rng(1)
    transforms = {}
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 5000, size=2))
        image_size = int(rng.choice([28, 56, 448]))
        max_tiles = int(rng.integers(1, 25))
        transform = transforms.setdefault((image_size, max_tiles), ImageTransform(image_size, max_tiles))
        cols, rows = ref_target_ratio(width, height, 1, max_tiles, image_size)
        expected = cols * rows + (1 if cols * rows > 1 else 0)
        assert transform.num_tiles(width, height) == expected, (width, height, image_size, max_tiles)


def test_thumbnail_only_with_multiple_tiles():
    wide = make_image(900, 300)
    assert ImageTransform(max_tiles=12)(wide).shape[0] == 3 + 1
    assert ImageTransform(max_tiles=12)(make_image(300, 300)).shape[0] == 1  # single tile, no thumbnail


def test_max_tiles_one_gives_single_tile():
    got = ImageTransform(image_size=56, max_tiles=1)(make_image(900, 100))
    assert got.shape == (1, 3, 56, 56)


def test_tiles_are_row_major_and_thumbnail_last():
    image = make_image(112, 56)  # 2x1 grid at image_size 56
    tiles = ImageTransform(image_size=56, mean=(0, 0, 0), std=(1 / 255,) * 3)(image)  # pixel values 0..255
    assert len(tiles) == 3
    as_rgb = tiles.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(as_rgb[0], rgb(image)[:, :56])
    np.testing.assert_array_equal(as_rgb[1], rgb(image)[:, 56:])
    np.testing.assert_array_equal(as_rgb[2], rgb(image.resize((56, 56), Image.Resampling.BICUBIC)))


def test_non_rgb_image_is_converted_in_call():
    gray = Image.fromarray(np.full((30, 40), 200, np.uint8), "L")
    got = ImageTransform(image_size=28)(gray)
    torch.testing.assert_close(got, ref_pixel_values(gray, input_size=28), rtol=0, atol=1e-6)


def test_load_pixel_values(tmp_path):
    image = make_image(700, 300)
    path = tmp_path / "x.png"
    image.save(path)
    got = ImageTransform(image_size=56, max_tiles=6).load_pixel_values(path)
    torch.testing.assert_close(got, ref_pixel_values(image, input_size=56, max_num=6), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": -5}, "image_size"),
        ({"image_size": 44.8}, "image_size"),
        ({"max_tiles": 0}, "max_tiles"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"mean": (0.5, 0.5)}, "mean"),
    ],
)
def test_transform_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ImageTransform(**kwargs)


@pytest.mark.parametrize(("size", "name"), [((0, 10), "width"), ((10, 0), "height")])
def test_num_tiles_argument_validation(size, name):
    with pytest.raises(ValueError, match=name):
        ImageTransform(56, 6).num_tiles(*size)


# ---------------------------------------------------------------------------------------------
# Loading: modes
# ---------------------------------------------------------------------------------------------


def test_rgb_png_round_trip(tmp_path):
    image = make_image(31, 17)
    image.save(tmp_path / "a.png")
    loaded = load_image(str(tmp_path / "a.png"))
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(rgb(loaded), rgb(image))


def test_grayscale(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L").save(tmp_path / "g.png")
    loaded = load_image(tmp_path / "g.png")
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(rgb(loaded)[0], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])


def test_one_bit(tmp_path):
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").convert("1").save(tmp_path / "b.png")
    loaded = load_image(tmp_path / "b.png")
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(rgb(loaded)[0], [[0, 0, 0], [255, 255, 255]])


def test_rgba_composited_on_white(tmp_path):
    data = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    Image.fromarray(data, "RGBA").save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB"
    np.testing.assert_allclose(rgb(loaded)[0], [[255, 0, 0], [255, 255, 255], [127, 127, 255]], atol=1)


def test_la_composited_on_white(tmp_path):
    data = np.array([[[0, 255], [0, 0]]], np.uint8)
    Image.fromarray(data, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "la.png"))[0], [[0, 0, 0], [255, 255, 255]])


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2])
    pal.info["transparency"] = 2  # index 2 (black) is transparent
    for name in ("p.png", "p.gif"):
        pal.save(tmp_path / name, transparency=2)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(rgb(loaded)[0], [[255, 0, 0], [0, 255, 0], [255, 255, 255]])


def test_palette_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "p.png"))[0], [[10, 20, 30], [200, 100, 50]])


def test_rgb_with_trns_chunk(tmp_path):
    Image.fromarray(np.array([[[1, 2, 3], [9, 9, 9]]], np.uint8), "RGB").save(
        tmp_path / "t.png", transparency=(1, 2, 3)
    )
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "t.png"))[0], [[255, 255, 255], [9, 9, 9]])


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16bit_grayscale_scaled(tmp_path, suffix):
    data = np.array([[0, 257 * 100, 257 * 128, 65535]], np.uint16)
    path = tmp_path / f"g16.{suffix}"
    Image.fromarray(data).save(path)
    assert Image.open(path).mode.startswith("I;16")
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(rgb(loaded)[0, :, 0], [0, 100, 128, 255])
    np.testing.assert_array_equal(rgb(loaded)[..., 0], rgb(loaded)[..., 2])


def test_32bit_int_grayscale(tmp_path):
    Image.fromarray(np.array([[0, 257 * 64, 65535]], np.int32), "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "i.tif"))[0, :, 0], [0, 64, 255])
    Image.fromarray(np.array([[-100, 0, 100]], np.int32), "I").save(tmp_path / "signed.tif")
    # Negative values: no nominal range, stretched min..max.
    np.testing.assert_allclose(rgb(load_image(tmp_path / "signed.tif"))[0, :, 0], [0, 128, 255], atol=1)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 255.0], [0, 100, 255]), ([-1.0, 0.0, 1.0], [0, 128, 255])],
)
def test_float_grayscale(tmp_path, values, expected):
    Image.fromarray(np.array([values], np.float32), "F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(rgb(load_image(tmp_path / "f.tif"))[0, :, 0], expected, atol=1)


def test_cmyk(tmp_path):
    data = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8)
    Image.fromarray(data, "CMYK").save(tmp_path / "c.tif")
    loaded = load_image(tmp_path / "c.tif")
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(rgb(loaded)[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])
    Image.fromarray(data, "CMYK").resize((24, 8), Image.Resampling.NEAREST).save(tmp_path / "c.jpg", quality=100)
    jpg = load_image(tmp_path / "c.jpg")
    assert jpg.mode == "RGB" and jpg.size == (24, 8)
    np.testing.assert_allclose(rgb(jpg)[4, 12], [0, 255, 255], atol=12)


def test_exif_orientation_applied(tmp_path):
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 = rotate 90 deg
    # clockwise for display, so the displayed image is 20 x 40 with red on top, blue at bottom.
    data = np.zeros((20, 40, 3), np.uint8)
    data[:, :20] = (255, 0, 0)
    data[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(data, "RGB").save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "r.jpg")
    assert loaded.size == (20, 40)
    px = rgb(loaded)
    np.testing.assert_allclose(px[5, 10], [255, 0, 0], atol=10)
    np.testing.assert_allclose(px[35, 10], [0, 0, 255], atol=10)


# ---------------------------------------------------------------------------------------------
# Loading: errors
# ---------------------------------------------------------------------------------------------


# Both readers refuse the same files with the same reasons: load_image (training) and decoded_size
# (building the data set, so that bad files fail before training).
READERS = pytest.mark.parametrize("reader", [load_image, decoded_size], ids=["load_image", "decoded_size"])


def assert_load_error(path: Path, reason_fragment: str, reader=load_image) -> None:
    with pytest.raises(ImageLoadError) as info:
        reader(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert reason_fragment in info.value.reason
    assert info.value.path == path


@READERS
def test_missing_file(tmp_path, reader):
    assert_load_error(tmp_path / "nope.png", "not found", reader)


@READERS
def test_directory(tmp_path, reader):
    assert_load_error(tmp_path, "not a regular file", reader)


@READERS
def test_zero_byte_file(tmp_path, reader):
    (tmp_path / "empty.png").write_bytes(b"")
    assert_load_error(tmp_path / "empty.png", "empty", reader)


@READERS
@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True})])
def test_truncated_file(tmp_path, fmt, options, reader):
    """Cut in half: the header is intact (Image.open reads the size), the pixel data is not."""
    buf = io.BytesIO()
    make_image(200, 200).save(buf, fmt, **options)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(path) as header_only:
        assert header_only.size == (200, 200)
    assert_load_error(path, "truncated", reader)


@READERS
def test_corrupt_data(tmp_path, reader):
    buf = io.BytesIO()
    make_image(64, 64).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[100:400] = bytes(300)  # clobber compressed pixel data, keep the header
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert_load_error(tmp_path / "bad.png", "corrupt", reader)


@READERS
def test_not_an_image(tmp_path, reader):
    (tmp_path / "notes.jpg").write_text("definitely not pixels\n")
    assert_load_error(tmp_path / "notes.jpg", "not a recognised image", reader)


@READERS
@pytest.mark.parametrize("side", [11, 20])  # 121 px: warning level (>100); 400 px: error level (>200)
def test_decompression_bomb(tmp_path, monkeypatch, side, reader):
    make_image(side, side).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning must become our error, not leak out
        assert_load_error(tmp_path / "bomb.png", "decompression bomb", reader)
    assert Image.MAX_IMAGE_PIXELS == 100  # limit is not changed by the reader


def test_a_bomb_is_refused_while_other_threads_open_images(tmp_path, monkeypatch):
    """The data set's check opens images on several threads: each bomb is refused whatever the others do
    (warning filters are process-global; one thread's filter restore must not let another's bomb through)."""
    make_image(11, 11).save(tmp_path / "bomb.png")  # 121 px: Pillow's warning level (limit 100)
    make_image(8, 8).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    def opens(i: int) -> list[str]:
        outcomes = []
        for j in range(60):
            name = "bomb.png" if (i + j) % 2 else "fine.png"
            try:
                decoded_size(tmp_path / name)
                outcomes.append(f"{name}: read")
            except ImageLoadError as e:
                outcomes.append(f"{name}: {'bomb' if 'decompression bomb' in str(e) else str(e)}")
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seen = [o for outcomes in pool.map(opens, range(8)) for o in outcomes]
    assert set(seen) == {"bomb.png: bomb", "fine.png: read"}, sorted(set(seen))


@pytest.mark.parametrize(
    "name, options",
    [
        ("a.png", {}),
        ("a.jpg", {"quality": 90}),
        ("p.jpg", {"progressive": True}),
        ("a.gif", {}),
        ("a.tif", {}),
        ("a.webp", {}),
        ("gray.jpg", {"mode": "L"}),
        ("cmyk.jpg", {"mode": "CMYK"}),
    ],
)
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_decoded_size_is_the_loaded_size(tmp_path, name, options, orientation):
    """decoded_size (JPEGs in draft mode) gives the size of the image training loads, EXIF rotation
    applied; the reference is Pillow's own full decode + exif_transpose. 301x97: not a multiple of the
    8-pixel JPEG block, so a scaled decode's size would show."""
    options = dict(options)
    image = make_image(301, 97).convert(options.pop("mode", "RGB"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / name
    image.save(path, exif=exif.tobytes(), **options)
    with Image.open(path) as img:
        expected = ImageOps.exif_transpose(img).size
    assert expected == ((97, 301) if orientation in (6, 8) and not name.endswith(".gif") else (301, 97))
    assert decoded_size(path) == expected == load_image(path).size


def test_under_bomb_limit_loads(tmp_path, monkeypatch):
    make_image(10, 10).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(tmp_path / "ok.png").size == (10, 10)


def test_error_pickles():
    err = pickle.loads(pickle.dumps(ImageLoadError("/x/y.png", "boom")))
    assert (err.path, err.reason) == ("/x/y.png", "boom")
    assert "/x/y.png" in str(err) and "boom" in str(err)


@pytest.mark.parametrize("size", [(1, 1), (10, 10), (300, 100), (100, 500), (4000, 3000), (448, 448)])
def test_num_tiles_from_size_matches_tiling(size):
    transform = ImageTransform(image_size=56, max_tiles=12)
    image = Image.new("RGB", size)
    assert transform.num_tiles(*size) == transform(image).shape[0]


@pytest.mark.parametrize("orientation", [5, 7])
def test_transposing_exif_orientations_swap_the_size_and_move_the_pixels(tmp_path, orientation):
    """Orientations 5 (transpose: mirror about the main diagonal) and 7 (transverse: the other diagonal)
    swap width and height, in decoded_size too. Every pixel lands where numpy's transpose puts it."""
    data = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3  # 6 wide x 4 high, every pixel distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "t.png"  # lossless: exact pixels
    Image.fromarray(data, "RGB").save(path, exif=exif.tobytes())
    expected = data.transpose(1, 0, 2) if orientation == 5 else data[::-1, ::-1].transpose(1, 0, 2)
    loaded = load_image(path)
    assert loaded.size == decoded_size(path) == (4, 6)
    np.testing.assert_array_equal(rgb(loaded), expected)


def test_16bit_scaling_divides_by_257_where_256_rounds_apart(tmp_path):
    """65535 maps to 255: the scale is 255/65535 = 1/257. Each value here rounds differently under 1/256."""
    values = np.array([[51400, 65000, 2690]], np.uint16)
    assert (np.rint(values / 257.0) != np.rint(values / 256.0)).all()
    Image.fromarray(values).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(rgb(load_image(tmp_path / "g16.png"))[0, :, 0], np.rint(values[0] / 257.0))
