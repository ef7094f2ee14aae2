"""tools/twemoji.py on a tarball in the npm package's layout, made here: one folder per category,
skin-tone variants with their emoji, 'Component' left out, transparency composited on white."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from tools import twemoji

INDEX = [
    {"image": "1f600.png", "category": "Smileys & Emotion"},
    {"image": "1f44b.png", "category": "People & Body",
     "skin_variations": {"1F3FB": {"image": "1f44b-1f3fb.png"}, "1F3FC": {"image": "1f44b-1f3fc.png"}}},
    {"image": "1f3fb.png", "category": "Component"},
    {"image": "1f1eb-1f1f7.png", "category": "Flags"},
]


def png(alpha: int) -> bytes:
    """A 4×4 RGBA image: red at the given opacity."""
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0], pixels[..., 3] = 255, alpha
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(out, format="PNG")
    return out.getvalue()


def write_tarball(path: Path) -> None:
    files = {"package/emoji.json": json.dumps(INDEX).encode(), "package/package.json": b'{"version": "16.0.0"}'}
    names = ["1f600.png", "1f44b.png", "1f44b-1f3fb.png", "1f44b-1f3fc.png", "1f3fb.png", "1f1eb-1f1f7.png"]
    files |= {f"package/img/twitter/64/{name}": png(0 if name == "1f600.png" else 255) for name in names}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_the_folder_has_a_class_per_category_on_white(tmp_path: Path, capsys) -> None:
    write_tarball(tmp_path / "emoji.tgz")
    assert twemoji.main(["--tarball", str(tmp_path / "emoji.tgz"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("5 images in 3 classes under ")
    classes = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert classes == ["Flags", "People_and_Body", "Smileys_and_Emotion"]
    assert len(list((tmp_path / "out" / "People_and_Body").iterdir())) == 3  # the emoji and its two skin tones
    clear = Image.open(tmp_path / "out" / "Smileys_and_Emotion" / "1f600.png")
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)  # transparent became white
    assert Image.open(tmp_path / "out" / "Flags" / "1f1eb-1f1f7.png").getpixel((0, 0)) == (255, 0, 0)
    assert "CC-BY 4.0" in (tmp_path / "out" / "ATTRIBUTION.txt").read_text()


def test_a_file_that_is_not_the_package_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    assert twemoji.main(["--tarball", str(tmp_path / "bad.tgz"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an emoji-datasource tarball" in err and len(err.splitlines()) == 1
