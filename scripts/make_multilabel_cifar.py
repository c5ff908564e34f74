"""Multi-label images from CIFAR-10: 2x2 mosaics whose labels are the classes of their tiles.

Each of a mosaic's four 32 px tiles is a CIFAR-10 image with probability `--fill` (else a
plain grey tile), its class drawn with weight `--decay`**rank, so labels range from common
to rare; a mosaic's labels are the distinct classes it shows (none, for an all-grey one).
Training mosaics come from CIFAR's train/ images, validation ones from test/, each image
used at most once. Writes OUT/images/{train,val}/NNNNN.png and OUT/labels.csv (file, labels
joined by one space, split), ready for `data.dataset: csv` with `task: multilabel`:

    python scripts/make_multilabel_cifar.py --src /work/shared/data/cifar10 --out data/multilabel_cifar
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

GREY = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="CIFAR-10 with train/<class>/, test/<class>/")
    parser.add_argument("--out", type=Path, default=Path("data/multilabel_cifar"))
    parser.add_argument("--train", type=int, default=3000, help="training mosaics")
    parser.add_argument("--val", type=int, default=1000, help="validation mosaics")
    parser.add_argument("--fill", type=float, default=0.75, help="chance that a tile holds an image")
    parser.add_argument("--decay", type=float, default=0.75, help="class k is drawn with weight decay**k")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    classes = sorted(p.name for p in (args.src / "train").iterdir() if p.is_dir())
    weights = args.decay ** np.arange(len(classes))
    rows = []
    for split, source, count in (("train", "train", args.train), ("val", "test", args.val)):
        pools = {c: list(rng.permutation(sorted((args.src / source / c).glob("*.jpg")))) for c in classes}
        for i in range(count):
            name = f"images/{split}/{i:05d}.png"
            labels = _mosaic(pools, classes, weights / weights.sum(), args.fill, rng, args.out / name)
            rows.append({"file": name, "labels": " ".join(labels), "split": split})
    pd.DataFrame(rows).to_csv(args.out / "labels.csv", index=False)
    table = pd.DataFrame(rows)
    for split in ("train", "val"):
        part = table[table["split"] == split]["labels"].str.split()
        shares = {c: part.apply(lambda labels, c=c: c in labels).mean() for c in classes}
        print(split, ", ".join(f"{c} {s:.1%}" for c, s in shares.items()))
    print(f"wrote {len(rows)} mosaics and {args.out / 'labels.csv'}")


def _mosaic(
    pools: dict[str, list[Path]],
    classes: list[str],
    p: np.ndarray,
    fill: float,
    rng: np.random.Generator,
    out: Path,
) -> list[str]:
    """Write one 64 px mosaic; its labels, sorted."""
    canvas = np.full((64, 64, 3), GREY, dtype=np.uint8)
    labels = set()
    for tile in range(4):
        if rng.random() >= fill:
            continue
        name = classes[rng.choice(len(classes), p=p)]
        with Image.open(pools[name].pop()) as image:
            pixels = np.asarray(image.convert("RGB").resize((32, 32)))
        row, col = divmod(tile, 2)
        canvas[row * 32 : row * 32 + 32, col * 32 : col * 32 + 32] = pixels
        labels.add(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out)
    return sorted(labels)


if __name__ == "__main__":
    main()
