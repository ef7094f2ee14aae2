"""Twemoji as a labelled RGB image folder, for ``data.name=folder``: real colour images to check quality on.

    npm pack emoji-datasource-twitter@16.0.0          # 3,786 64×64 RGBA PNGs and their emoji.json
    python tools/twemoji.py --tarball emoji-datasource-twitter-16.0.0.tgz --out DIR

Each image (skin-tone variants included) goes to the folder of its emoji's Unicode category in
``emoji.json``, composited on white: ``DIR/<category>/<name>.png``, 64×64 RGB. The 'Component'
category (skin-tone swatches and hair parts, 5 images) is left out, which leaves 3,781 images in 9
classes. The artwork is Twitter's Twemoji under CC-BY 4.0; ``DIR/ATTRIBUTION.txt`` says so. With no
``train/``/``test/`` below it, gan_dist holds out a seeded ``data.holdout`` share of each class as
the test split.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

IMAGES = "package/img/twitter/64/"
INDEX = "package/emoji.json"
LEFT_OUT = {"Component"}
ATTRIBUTION = """Twemoji graphics by Twitter, Inc. and other contributors, licensed under CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), as packaged in emoji-datasource-twitter@{version}.
Changed: composited on white and sorted into folders by Unicode category (from its emoji.json).
"""


def categories(index: list[dict]) -> Iterator[tuple[str, str]]:
    """(image file, category) of every emoji and each of its skin-tone variants."""
    for emoji in index:
        yield emoji["image"], emoji["category"]
        for variant in (emoji.get("skin_variations") or {}).values():
            yield variant["image"], emoji["category"]


def on_white(png: bytes) -> Image.Image:
    """An RGBA (or palette) PNG composited on a white background, as RGB."""
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")


def write_folder(tarball: Path, out: Path) -> Counter:
    """Write ``out/<category>/<image>`` for each image the index names; returns the count per category."""
    with tarfile.open(tarball) as tar:
        index = json.load(tar.extractfile(INDEX))
        version = json.load(tar.extractfile("package/package.json"))["version"]
        members = {m.name.removeprefix(IMAGES): m for m in tar.getmembers() if m.name.startswith(IMAGES)}
        counts: Counter = Counter()
        for image, category in categories(index):
            if category in LEFT_OUT or image not in members:
                continue
            folder = out / category.replace("&", "and").replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            on_white(tar.extractfile(members[image]).read()).save(folder / image)
            counts[category] += 1
    (out / "ATTRIBUTION.txt").write_text(ATTRIBUTION.format(version=version))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tarball", required=True, type=Path, help="emoji-datasource-twitter-<version>.tgz")
    parser.add_argument("--out", required=True, type=Path, help="folder to write, one subfolder per category")
    args = parser.parse_args(argv)
    try:
        counts = write_folder(args.tarball, args.out)
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as e:
        reason = (str(e).splitlines() or [""])[0]
        print(f"error: {args.tarball}: not an emoji-datasource tarball ({type(e).__name__}: {reason})", file=sys.stderr)
        return 2
    print(f"{sum(counts.values())} images in {len(counts)} classes under {args.out}: "
          + ", ".join(f"{c} {n}" for c, n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
