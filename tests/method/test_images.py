"""Reference images are loaded as a viewer shows them."""
from __future__ import annotations

from PIL import Image

from blockskip_ray.method.images import load_images


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (64, 32), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display" (portrait photo from a phone)
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    (got,) = load_images(tmp_path)
    assert got.size == (32, 64)  # portrait, as displayed
    top, bottom = got.getpixel((16, 8)), got.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60, top  # the left (red) half is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60, bottom
