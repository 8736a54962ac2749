"""Served vision models get each image as cheaply as it can go: a JPEG, PNG or WebP that a server can take as it
is travels as the file's own bytes; anything larger than --vlm_max_side, rotated by EXIF, CMYK, 16-bit,
transparent, palette, animated or truncated is converted (upright RGB JPEG within the max side) first."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.conftest import caches, make_image, run_main
from tests.llm_server import sha12
from tests.test_families import image_parts, is_vision_request
from tests.test_reliability import cmyk_jpeg, exif_rotated_jpeg, palette_transparent_png, sixteen_bit_png, \
    truncated_jpeg, two_colour

MAX_SIDE = 256


def served_run(capsys, folder: Path, server, *extra) -> tuple[int, str]:
    """The script over `folder` with the loopback server as both endpoints (no local model to load)."""
    code, out, err = run_main(capsys, "--dataset_dir", folder, "--model_id", folder.parent / "no-such-model",
                              "--vlm_base_url", server.base_url, "--vlm_model", "test-model",
                              "--vlm_max_side", MAX_SIDE, "--base_url", server.base_url, "--model", "test-model",
                              *extra)
    return code, out + err


def sent_image(image: Path, requests: list[dict]) -> tuple[str, bytes]:
    """(MIME type, bytes) of the image the request behind this image's caption carried: the fake server answers
    a vision request with "VISION " + sha12(its data URL), and the script writes that next to the image."""
    generated = caches(image)[0].read_text(encoding="utf-8").strip()
    urls = [url for r in requests if is_vision_request(r) for url in image_parts(r)]
    matches = [url for url in urls if "VISION " + sha12(url) == generated]
    assert len(matches) == 1, f"{image.name}: {len(matches)} requests carry it"
    header, data = matches[0].split(",", 1)
    assert header.startswith("data:") and header.endswith(";base64"), header
    return header[len("data:"):-len(";base64")], base64.b64decode(data)


def opened(data: bytes):
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def rgb_at(img, xy) -> tuple[int, int, int]:
    return img.convert("RGB").getpixel(xy)


def near(colour, expected, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


def with_exif_orientation_png(path: Path, orientation: int) -> Path:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    two_colour((40, 20), (255, 0, 0), (0, 0, 255)).save(path, format="PNG", exif=exif.tobytes())
    return path


def animated(path: Path, fmt: str) -> Path:
    frames = [two_colour((32, 24), (255, 0, 0), (0, 0, 255)), two_colour((32, 24), (0, 255, 0), (0, 0, 0))]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def upright_jpeg_exif_1(path: Path) -> Path:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 1
    two_colour((48, 32), (200, 120, 40), (30, 90, 160)).save(path, format="JPEG", quality=90, exif=exif.tobytes())
    return path


# --------------------------------------------------------------------------------------------
# Sent as they are
# --------------------------------------------------------------------------------------------


def test_images_a_server_takes_as_they_are_arrive_byte_for_byte(tmp_path, capsys, llm_server):
    folder = tmp_path / "ds"
    own = {
        make_image(folder / "photo.jpg", 1): "image/jpeg",
        make_image(folder / "drawing.png", 2): "image/png",
        make_image(folder / "web.webp", 3): "image/webp",
        make_image(folder / "grey.jpg", 4, mode="L"): "image/jpeg",  # 8-bit greyscale: servers make it RGB
        make_image(folder / "edge.jpg", 6, size=(MAX_SIDE, MAX_SIDE // 2)): "image/jpeg",  # exactly the max side
        upright_jpeg_exif_1(folder / "tagged.jpg"): "image/jpeg",  # orientation 1: as stored
    }
    code, output = served_run(capsys, folder, llm_server)
    assert code == 0, output
    for image, mime in own.items():
        assert sent_image(image, llm_server.requests) == (mime, image.read_bytes()), image.name
    assert sum(is_vision_request(r) for r in llm_server.requests) == len(own)


# --------------------------------------------------------------------------------------------
# Converted first
# --------------------------------------------------------------------------------------------


def check_converted(image: Path, requests: list[dict]):
    mime, data = sent_image(image, requests)
    assert mime == "image/jpeg" and data != image.read_bytes(), image.name
    img = opened(data)
    assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= MAX_SIDE, (image.name, img.size)
    return img


def test_large_rotated_cmyk_and_transparent_images_arrive_converted(tmp_path, capsys, llm_server):
    from PIL import Image

    folder = tmp_path / "ds"
    folder.mkdir()
    large = make_image(folder / "large.jpg", 1, size=(1500, 1000))
    rotated = exif_rotated_jpeg(folder / "rotated.jpg", 6)  # stored red left, blue right; shown red on top
    cmyk = cmyk_jpeg(folder / "cmyk.jpg")  # red left, blue right
    rgba = folder / "rgba.png"
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # left half transparent, right half opaque blue
    img.paste((0, 0, 255, 255), (16, 0, 32, 32))
    img.save(rgba)
    code, output = served_run(capsys, folder, llm_server)
    assert code == 0, output

    assert check_converted(large, llm_server.requests).size == (MAX_SIDE, 171)
    upright = check_converted(rotated, llm_server.requests)
    assert upright.size == (20, 40)
    assert near(rgb_at(upright, (10, 5)), (255, 0, 0)) and near(rgb_at(upright, (10, 34)), (0, 0, 255))
    converted = check_converted(cmyk, llm_server.requests)
    assert near(rgb_at(converted, (4, 16)), (255, 0, 0)) and near(rgb_at(converted, (28, 16)), (0, 0, 255))
    flat = check_converted(rgba, llm_server.requests)
    assert near(rgb_at(flat, (4, 16)), (255, 255, 255)) and near(rgb_at(flat, (28, 16)), (0, 0, 255))


def test_other_images_a_server_might_misread_arrive_converted(tmp_path, capsys, llm_server):
    folder = tmp_path / "ds"
    folder.mkdir()
    sixteen = sixteen_bit_png(folder / "sixteen.png")  # left white, right black
    palette = palette_transparent_png(folder / "palette.png")
    png_rotated = with_exif_orientation_png(folder / "png_rotated.png", 6)
    moving_png = animated(folder / "moving_png.png", "PNG")
    moving_webp = animated(folder / "moving_webp.webp", "WEBP")
    code, output = served_run(capsys, folder, llm_server)
    assert code == 0, output
    grey = check_converted(sixteen, llm_server.requests)
    assert near(rgb_at(grey, (4, 16)), (255, 255, 255)) and near(rgb_at(grey, (28, 16)), (0, 0, 0))
    check_converted(palette, llm_server.requests)
    upright = check_converted(png_rotated, llm_server.requests)
    assert upright.size == (20, 40) and near(rgb_at(upright, (10, 5)), (255, 0, 0))
    for image in (moving_png, moving_webp):  # the first frame, as a still
        still = check_converted(image, llm_server.requests)
        assert near(rgb_at(still, (4, 12)), (255, 0, 0)) and near(rgb_at(still, (28, 12)), (0, 0, 255))


def test_a_truncated_jpeg_is_not_sent_and_fails_with_its_reason(tmp_path, capsys, llm_server):
    folder = tmp_path / "ds"
    folder.mkdir()
    broken = truncated_jpeg(folder / "broken.jpg")
    good = make_image(folder / "good.jpg", 3)
    code, output = served_run(capsys, folder, llm_server)
    assert code == 1, output
    assert "broken.jpg" in output and "cannot decode image" in output
    assert sent_image(good, llm_server.requests) == ("image/jpeg", good.read_bytes())
    assert sum(is_vision_request(r) for r in llm_server.requests) == 1
    assert not caches(broken)[0].exists()
    # remembered as the served stage's bad input: the next run neither converts it nor asks, until the file changes
    remembered = (folder / ".enhance_captions" / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["failing"] for line in remembered] == ["broken.jpg"]
    asked = len(llm_server.requests)
    code, output = served_run(capsys, folder, llm_server)
    assert code == 1 and "still failing since" in output, output
    assert len(llm_server.requests) == asked


@pytest.mark.parametrize("max_side", [64, 63])
def test_the_max_side_decides_between_own_bytes_and_conversion(tmp_path, max_side):
    """A 64x48 JPEG goes as it is at --vlm_max_side 64, and is converted (to 63x47) at 63."""
    import enhance_captions as ec

    image = make_image(tmp_path / "photo.jpg", 1)
    url = ec.own_bytes_url(image, max_side)
    if max_side == 64:
        assert url == "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode("ascii")
    else:
        assert url is None
        assert opened(base64.b64decode(ec.image_data_url(image, max_side).split(",", 1)[1])).size == (63, 47)
