"""Streamed (iterable) data sets, read in order rather than by index: WebDataset shards (`wds/PATTERN`, read with
`tarfile`) and timm's streaming Hugging Face reader (`hfids/NAME[:SPLIT]`). docs/data.md ("Data formats") gives the
shard layout and how shards are split over ranks and workers.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import math
import os
import random
import re
import tarfile
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mambaout.data.image import load_image, to_rgb
from mambaout.utils.interrupt import ignore_sigint
from mambaout.utils.limits import MAX_NUM_CLASSES

logger = logging.getLogger("mambaout")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ITERABLE_PREFIXES = ("wds/", "hfids/")
# Shards one pattern may name. ImageNet-1k in WebDataset form is ~1,300 shards of ~100 MB; LAION-5B ~230,000.
MAX_SHARDS = 1_000_000
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_urls(pattern: str) -> list[str]:
    """`a-{000..012}.tar` brace ranges (several in one name multiply: `s-{0..2}-{0..1}.tar` is 6 shards),
    `::`-separated lists and globs -> the sorted list of shard paths. ValueError for ranges that run backwards or
    name more than `MAX_SHARDS` shards (checked before any list is built), FileNotFoundError for a missing shard.
    """
    parts = [(part, list(_RANGE.finditer(part))) for part in pattern.split("::")]
    for m in (m for _, ranges in parts for m in ranges):
        if int(m.group(2)) < int(m.group(1)):
            raise ValueError(f"WebDataset pattern {pattern!r}: the range {m.group(0)} runs backwards")
    total = sum(math.prod(int(m.group(2)) - int(m.group(1)) + 1 for m in ranges) for _, ranges in parts if ranges)
    if total > MAX_SHARDS:
        raise ValueError(
            f"WebDataset pattern {pattern!r} names {total:,} shards, more than the {MAX_SHARDS:,} one data set may "
            "have; check the brace range"
        )
    out = []
    for part, ranges in parts:
        if ranges:
            out += _expand_ranges(part)
        elif any(c in part for c in "*?["):
            out += sorted(glob.glob(part))
        elif os.path.isdir(part):
            out += sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            out.append(part)
    missing = [p for p in out if not os.path.isfile(p)]
    if not out or missing:
        raise FileNotFoundError(
            f"WebDataset shards not found: {missing[:3] or pattern}; expected e.g. DIR/train-{{0000..0099}}.tar"
        )
    return out


def _expand_ranges(part: str) -> list[str]:
    """Every name of `part` with its brace ranges filled in, the last range varying fastest (as brace expansion
    in a shell); each number zero-padded to the width of its range's first bound."""
    bits = _RANGE.split(part)  # text, lo, hi, text, lo, hi, ..., text
    numbers = [[str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)] for lo, hi in zip(bits[1::3], bits[2::3])]
    return ["".join(t + n for t, n in zip(bits[::3], combo)) + bits[-1] for combo in itertools.product(*numbers)]


def _grouped(path: str, read):
    """(key, {extension: read(tar, member, extension)}) of each sample of one shard, in order. A sample is the run of
    files sharing a key: the path up to the first dot of the file name (`dir/s0001.seg.png`: key `dir/s0001`,
    extension `seg.png`)."""

    def split(member):
        key, _, ext = os.path.basename(member.name).partition(".")
        return os.path.join(os.path.dirname(member.name), key), ext.lower(), member

    with tarfile.open(path, "r|*") as tar:  # streaming mode: sequential reads only
        files = (split(member) for member in tar if member.isfile())
        for key, group in itertools.groupby(files, key=lambda f: f[0]):
            yield key, {ext: read(tar, member, ext) for _, ext, member in group}


def iter_shard(path: str):
    """(key, image bytes, label) of each complete sample (an image and its `.cls` label) in one shard, in order;
    the incomplete ones were counted and said when the data set was opened (`count_samples`)."""
    for key, parts in _grouped(path, lambda tar, member, ext: tar.extractfile(member).read()):
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None or "cls" not in parts:
            logger.debug("WebDataset sample %s in %s has no image or no .cls label; skipped", key, path)
            continue
        yield key, image, parse_label(parts["cls"], path, key)


def parse_label(data: bytes, shard: str, key: str, num_classes: int | None = None) -> int:
    """A `.cls` member's label, checked: an integer in [0, num_classes) (or below `MAX_NUM_CLASSES` when the class
    count is not known), else ValueError naming the shard and the sample key."""
    text = data[:64].decode("utf-8", "replace").strip()
    bound = num_classes if num_classes is not None else MAX_NUM_CLASSES
    try:
        label = int(text)
    except ValueError:
        label = None
    if label is None or not 0 <= label < bound or len(data) > 64:
        known = f"{num_classes} classes in classes.txt" if num_classes is not None else f"at most {bound:,} classes"
        raise ValueError(
            f"WebDataset shard {shard}: sample {key!r} has label {text[:20]!r}, not an integer from 0 to {bound - 1} "
            f"({known}); fix or drop that sample"
        )
    return label


def count_samples(shards: list[str], num_classes: int | None = None) -> tuple[int, int]:
    """(complete samples, highest label) in the shards, reading only the headers and the small `.cls` members; every
    label is checked (`parse_label`). Samples without a label or an image are counted per shard and said in one
    warning line naming the shard, or, when no sample is complete, in one ValueError line."""

    def read(tar, member, ext):
        return tar.extractfile(member).read(65) if ext == "cls" else None

    n, top = 0, -1
    incomplete = []  # (shard, samples without a label, samples without an image, samples)
    for path in shards:
        no_label = no_image = total = 0
        for key, parts in _grouped(path, read):
            total += 1
            if "cls" not in parts:
                no_label += 1
            elif not any(e in parts for e in IMAGE_EXTS):
                no_image += 1
            else:
                n += 1
                top = max(top, parse_label(parts["cls"], path, key, num_classes))
        if no_label or no_image:
            incomplete.append((path, no_label, no_image, total))
    if incomplete:
        path, no_label, no_image, total = incomplete[0]
        what = [f"{no_label} of its {total} samples carry no .cls label"] if no_label else []
        what += [f"{no_image} have a .cls label but no image ({', '.join(IMAGE_EXTS)})"] if no_image else []
        rest = sum(a + b for _, a, b, _ in incomplete[1:])
        more = f" (and {len(incomplete) - 1} more shard(s) with {rest} such samples)" if len(incomplete) > 1 else ""
        line = f"WebDataset shard {path}: {' and '.join(what)}{more}"
        if n == 0:
            raise ValueError(
                f"{line}; no sample is an image with its label, nothing to train on or score: write each label as "
                "KEY.cls (the class index as text) beside KEY.jpg"
            )
        skipped = sum(a + b for _, a, b, _ in incomplete)
        logger.warning("%s; %d incomplete sample(s) skipped, %d used", line, skipped, n)
    return n, top


def write_shards(samples, pattern: str, per_shard: int) -> list[str]:
    """Write `(key, image bytes, ext, label)` samples to WebDataset shards `pattern % shard_index`."""
    paths = []
    for _, shard in itertools.groupby(enumerate(samples), lambda item: item[0] // per_shard):  # lazily, shard by shard
        paths.append(pattern % len(paths))
        with tarfile.open(paths[-1], "w") as tar:
            for _, (key, data, ext, label) in shard:
                for suffix, payload in ((ext, data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return paths


class IterableImages(IterableDataset):
    """Images streamed from `wds/PATTERN` shards or timm's `hfids/NAME[:SPLIT]` reader, as `(image, label, 0)`.

    `training` shuffles the shards per epoch and the samples through `shuffle_buffer`; `rank`, `world_size`: this
    process's share; `length`: samples in the whole set (default: counted from the shard headers, or timm's split
    info for hfids).
    """

    def __init__(
        self,
        source: str,
        transform=None,
        training=False,
        rank=0,
        world_size=1,
        seed=0,
        shuffle_buffer=2000,
        length=None,
    ):
        self.source, self.transform, self.training = source, transform, training
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.epoch = 0
        if source.startswith("wds/"):
            self.shards = expand_urls(source[len("wds/") :])
            names = Path(self.shards[0]).parent / "classes.txt"
            named = names.read_text().split() if names.is_file() else None
            self.total, top = count_samples(self.shards, len(named) if named is not None else None)
            self.total = length or self.total
            self.classes = named if named is not None else [str(i) for i in range(top + 1)]
            self.reader = None
        elif source.startswith("hfids/"):
            from timm.data.readers import create_reader

            name, _, split = source.partition(":")
            self.shards = None
            self.reader = create_reader(name, root=None, split=split or "train", is_training=training, seed=seed)
            self.total = length or self.reader.num_samples  # the whole split (timm reads it from the split info)
            mapping = self.reader.class_to_idx  # the dataset's ClassLabel names
            self.classes = [str(c) for c, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        else:
            raise ValueError(f"not a streamed data set: {source!r}; expected one of {ITERABLE_PREFIXES}")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:  # this rank's share
        return self.total // self.world_size if self.training else -(-(self.total - self.rank) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.reader is not None and hasattr(self.reader, "set_epoch"):
            self.reader.set_epoch(epoch)

    def _samples(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        slots, slot = self.world_size * workers, self.rank * workers + worker
        if self.reader is not None:  # timm's reader shards over ranks and workers itself
            for img, target in self.reader:
                yield (img if not isinstance(img, bytes) else io.BytesIO(img)), target
            return
        shards = list(self.shards)
        if self.training:
            random.Random(self.seed + self.epoch).shuffle(shards)
        mine, keep = (shards[slot::slots], None) if len(shards) >= slots else (shards, slot)
        for i, (_, data, label) in enumerate(s for path in mine for s in iter_shard(path)):
            if keep is None or i % slots == keep:
                yield io.BytesIO(data), label

    def _decoded(self):
        for src, label in self._samples():
            try:
                img = to_rgb(src) if hasattr(src, "mode") else load_image(src)
            except (OSError, ValueError, SyntaxError) as e:
                logger.debug("skipping unreadable streamed image: %s", e)
                continue
            yield (self.transform(img) if self.transform is not None else img), int(label), 0

    def __iter__(self):
        if not self.training or self.shuffle_buffer <= 1:
            yield from self._decoded()
            return
        info = get_worker_info()
        rng = random.Random((self.seed, self.epoch, self.rank, info.id if info else 0).__hash__())
        buffer = []
        for item in self._decoded():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer


class StreamLoader(DataLoader):
    """A DataLoader over `IterableImages` keeping the `loaders.EpochLoader` contract: `len()` in batches (the
    DataLoader's own for a sized iterable set), `set_epoch` (forwarded to the data set). A stream cannot seek:
    mid-epoch resume replays the epoch's stream from its start (`skip_samples` is accepted and ignored)."""

    def __init__(self, dataset: IterableImages, batch_size: int, workers: int, pin: bool, drop_last: bool):
        kw = dict(num_workers=workers, pin_memory=pin, drop_last=drop_last, worker_init_fn=ignore_sigint)
        super().__init__(dataset, batch_size=batch_size, **kw)

    def skip_samples(self, n: int) -> None:
        pass  # a stream cannot seek: a resumed epoch is replayed from its start

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        # workers can end up with uneven shares: stop at the promised length so every rank takes as many steps
        return itertools.islice(super().__iter__(), len(self))


def is_streamed(path: str | None) -> bool:
    return bool(path) and str(path).startswith(ITERABLE_PREFIXES)


__all__ = ["IterableImages", "StreamLoader", "expand_urls", "is_streamed", "iter_shard", "write_shards"]
