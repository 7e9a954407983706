"""Regroup imagenet-sample-1k-112 (one photo per ImageNet class) into 5 coarse animal classes, split 3:1."""

import shutil
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
synsets = sorted(p.name for p in src.iterdir())  # sorted folder order = ImageNet-1k index
assert len(synsets) == 1000
groups = {  # ImageNet-1k index ranges (WordNet hierarchy)
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "dog": range(151, 269),
    "reptile_amphibian": range(25, 69),
    "invertebrate": [*range(69, 80), *range(107, 127), *range(300, 327)],
    "wild_mammal": [*range(269, 300), *range(330, 389)],
}
for name, idx in groups.items():
    for n, i in enumerate(idx):
        split = "val" if n % 4 == 3 else "train"
        for f in (src / synsets[i]).iterdir():
            out = dst / split / name / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out)
for split in ("train", "val"):
    print(split, {p.name: len(list(p.iterdir())) for p in sorted((dst / split).iterdir())})
