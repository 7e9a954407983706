"""The two dense tasks as `mambaout.training.trainer.Task`s, run by the engine that trains classification:
`DetectTask` (COCO instances, Mask/Faster R-CNN, box and mask AP), `SegmentTask` (UperNet, mIoU, pixel accuracy)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mambaout.data.loaders import train_loader
from mambaout.training import trainer as training
from mambaout.training.optim import FactorSchedule
from mambaout.training.runfolder import load_state, resume_path
from mambaout.training.trainer import fit
from mambaout.utils import distributed as dist
from mambaout.utils.device import autocast
from mambaout.utils.files import atomic_write_text
from mambaout.utils.interrupt import ignore_sigint
from mambaout.utils.text import count
from mambaout.weights.checkpoint import check_finite, read_checkpoint

from . import results as res
from . import semseg
from .coco import CocoInstances, ResizeFlip, coco_evaluate, collate, to_coco_results
from .config import DataConfig, RunConfig, from_dict
from .detection import DetectorConfig, create_detector
from .upernet import SegmenterConfig, create_segmenter


def train(cfg: RunConfig) -> dict:
    """Train as `cfg` says (or continue `cfg.train.resume`, in the run's folder unless told another)."""
    t = cfg.train
    if t.resume:
        t.output = t.output or str(resume_path(t.resume).parent.resolve())
    output = Path(t.output or Path("runs") / (Path(cfg.recipe).stem if cfg.recipe else cfg.task))
    loop = training.Loop.from_settings(vars(t), output=output, eval_every_steps=t.eval_every)
    return fit(make_task(cfg), loop)


def saved_config(resume: str) -> RunConfig:
    """The configuration a run folder (or its state.pt) was trained with."""
    path = resume_path(resume)
    try:
        return from_dict(load_state(path)["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"cannot read training state {path} ({type(e).__name__}: {e})") from e


def norm_exempt_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as Swin's dense configs set them (`paramwise_cfg.custom_keys`): no weight decay on parameters
    whose name holds `norm` (the backbone's LayerNorms), decay on all others, biases and the heads' BatchNorms too
    (mmseg names those `bn`; ours are numbered)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if "norm" in name else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=exempt, weight_decay=0.0)]


def lr_factor(step: int, total: int, t) -> float:
    """The learning rate of optimizer step `step` (0-based) over `t.lr`: linear warmup from `warmup_ratio`, then
    step decay at the `milestones` (fractions of the run) or polynomial decay to `min_lr`."""
    warm = t.warmup_ratio + (1 - t.warmup_ratio) * step / t.warmup_steps if step < t.warmup_steps else 1.0
    if t.schedule == "step":
        return warm * t.gamma ** sum(step >= round(m * total) for m in t.milestones)
    floor = t.min_lr / t.lr
    return warm * ((1 - floor) * (1 - min(step, total) / total) ** t.poly_power + floor)


class Task(training.Task):
    """What differs between detection and segmentation."""

    name: str
    metric: str  # the headline number, a key of `evaluate`'s result
    default_splits: tuple[str, str]

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.batch_size = cfg.data.batch_size

    # --- the training engine's interface (mambaout.training.trainer) -------------------------------------------------
    def config(self) -> dict:
        return self.cfg.to_dict()

    def build_data(self, env, device, loop: training.Loop) -> None:
        d = self.cfg.data
        self.train_data = self.train_set()  # also fixes the class count from the data
        self.val_data = self.val_set()
        # shuffled and sharded as classification's: an epoch's order is a function of (seed, epoch); fresh workers
        # each epoch take their seeds from the main process, which the engine seeds per epoch and rank
        self.batches = train_loader(
            self.train_data, d.batch_size, env.rank, env.world_size, loop.seed, d.workers, False, False, self.collate
        )
        self.steps_per_epoch, self.train_images = len(self.batches), len(self.train_data)

    def build_model(self, device) -> nn.Module:
        t = self.cfg.train
        model = self.create(self.cfg.model, t.pretrained, t.backbone_checkpoint).to(device)
        if dist.get_world_size() > 1 and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # one BatchNorm over all GPUs (Swin's)
        return model

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(norm_exempt_groups(model, self.cfg.train.weight_decay), lr=self.cfg.train.lr)

    def scheduler(self, optimizer, total_steps: int):
        return FactorSchedule(optimizer, lambda step: lr_factor(step, total_steps, self.cfg.train))

    def loss(self, model: nn.Module, inputs, targets) -> tuple[torch.Tensor, dict]:
        losses = model(inputs, targets)
        return sum(losses.values()), losses

    def evaluate_run(self, model: nn.Module, ema, device, amp_dtype) -> dict:
        metrics = self.evaluate(model, self.val_data, device, amp_dtype)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def banner(self, model: nn.Module, world_size: int) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        return (
            f"{c.task}: {c.model.backbone} {getattr(c.model, 'kind', 'upernet')} ({n_params:.2f}M params), "
            f"{self.train_images} training images, {c.model.num_classes} classes | {c.data.batch_size} x "
            f"{world_size} images a step | lr {c.train.lr:g} | {next(model.parameters()).device.type}"
        )

    def done(self, result: dict, out: Path) -> str:
        shown = self.describe({self.metric: result[self.metric]}) if self.metric in result else ""
        return f"done in {result['wall_s']:.0f}s: {shown}; weights {out / 'last.safetensors'}"

    # --- data ---------------------------------------------------------------------------------------------------------
    def split_paths(self, d: DataConfig, train: bool) -> tuple[str, str]:
        images, labels = (d.train_images, d.train_labels) if train else (d.val_images, d.val_labels)
        split = (d.train_split if train else d.val_split) or self.default_splits[0 if train else 1]
        if d.data is not None:
            auto_images, auto_labels = self.layout(Path(d.data), split)
            images, labels = images or str(auto_images), labels or str(auto_labels)
        if images is None or labels is None:
            which = "train" if train else "val"
            raise ValueError(f"no {which} data: pass --data ROOT, or --{which}-images and --{which}-labels")
        return images, labels

    def loader(self, dataset):
        """Evaluation batches of one image, in order; a line on stderr (rank 0) at most every `PROGRESS_EVERY_S`."""
        batches = torch.utils.data.DataLoader(
            dataset, num_workers=self.cfg.data.workers, collate_fn=self.collate, worker_init_fn=ignore_sigint
        )
        for n, batch in enumerate(batches, 1):
            yield batch
            now = time.monotonic()
            if n == 1:
                start = shown = now
            if dist.is_main() and n < len(dataset) and now - shown >= PROGRESS_EVERY_S:
                shown = now
                print(f"evaluating: {n}/{len(dataset)} images ({now - start:.0f}s)", file=sys.stderr, flush=True)

    def val_set(self, meta: dict | None = None):
        """The validation images as `evaluate` takes them: the first `max_val_images`, every world-size-th of them
        from this rank (each counted once over all ranks, no padding)."""
        d = self.cfg.data
        dataset = self.eval_dataset(*self.split_paths(d, train=False), meta)
        end = min(d.max_val_images or len(dataset), len(dataset))
        return torch.utils.data.Subset(dataset, range(dist.get_rank(), end, dist.get_world_size()))

    # --- what the commands differ in (mambaout.cli.dense, mambaout.cli.export) -------------------------------------
    network: str  # what `train` trains
    labels_help: str  # what --val-labels names
    validate_help: str
    predict_help: str  # what `predict` writes

    @staticmethod
    def check_options(args, validate: bool) -> None:
        """The task's `validate` (or `predict`) options checked before the model loads."""

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        """What a checkpoint carries so `validate` and `predict` rebuild the model and read its outputs."""
        return dict(
            task=self.name,
            dense_model=dataclasses.asdict(self.cfg.model),
            class_names=self.class_names,
            val_split=self.cfg.data.val_split or self.default_splits[1],  # validate's default under the same --data
        )

    @staticmethod
    def from_checkpoint(path: str, device) -> tuple[nn.Module, dict]:
        """A trained detector or segmenter from its checkpoint (written by `mambaout detect|segment train`)."""
        state, meta = read_checkpoint(path)
        check_finite(state, path)  # NaN weights would give AP 0 or a blank map with exit 0
        task = TASKS.get(meta.get("task"))
        if task is None:
            raise ValueError(
                f"{path} is not a detection or segmentation checkpoint (written by mambaout detect|segment train); "
                "a classification checkpoint starts training: --backbone-checkpoint"
            )
        model = task.create(task.model_config(**meta["dense_model"]))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: its weights do not fit the model its metadata describes ({e})") from e
        return model.to(device).eval(), meta


class DetectTask(Task):
    name = "detect"
    metric = "bbox_AP"
    default_splits = ("train2017", "val2017")
    collate = staticmethod(collate)
    model_config, create = DetectorConfig, staticmethod(create_detector)
    network, labels_help = "Mask R-CNN", "COCO instances JSON"
    validate_help = "COCO box and mask AP (pycocotools), and per-category AP"
    predict_help = (
        "detections (boxes, masks, names, scores), predictions.json and results.json (COCO results: every "
        "detection, boxes and RLE masks, for COCO.loadRes)"
    )

    @staticmethod
    def layout(root: Path, split: str) -> tuple[Path, Path]:
        images = root / "images" / split if (root / "images" / split).is_dir() else root / split
        return images, root / "annotations" / f"instances_{split}.json"

    def train_set(self):
        d, m = self.cfg.data, self.cfg.model
        images, ann = self.split_paths(d, train=True)
        transform = ResizeFlip(d.min_sizes, d.max_size, d.hflip)
        dataset = CocoInstances(images, ann, transform, m.kind == "mask_rcnn", filter_empty=True)  # mmdet's
        n = len(dataset.cat_ids)
        if not n or not dataset.coco.getAnnIds(iscrowd=False):
            what = "no categories" if not n else "no annotations (or only iscrowd ones)"
            raise ValueError(
                f"{ann} has {what}: a detector has nothing to learn from; give the training instances file"
            )
        if m.num_classes is not None and m.num_classes != n:
            raise ValueError(f"num_classes {m.num_classes} disagrees with the {n} categories of {ann}; leave it out")
        m.num_classes = n
        self.class_names, self.cat_ids = dataset.class_names, dataset.cat_ids
        return dataset

    def eval_dataset(self, images, ann, meta: dict | None = None):
        # no masks decoded here: COCOeval reads the truth from the JSON (checked for what it will read)
        dataset = CocoInstances(images, ann, None, masks=False, evaluate=self.iou_types())
        cat_ids = (meta or {}).get("cat_ids", getattr(self, "cat_ids", None))
        if cat_ids is not None and list(cat_ids) != dataset.cat_ids:
            raise ValueError(
                f"{ann} has {len(dataset.cat_ids)} categories (ids {dataset.cat_ids[:5]}...), the model was trained "
                f"on {len(cat_ids)} (ids {list(cat_ids)[:5]}...); evaluate it on data with the training categories"
            )
        self.cat_ids, self.coco = dataset.cat_ids, dataset.coco
        return dataset

    def iou_types(self) -> tuple[str, ...]:
        """What COCOeval scores: boxes, and masks too for Mask R-CNN."""
        return ("bbox", "segm") if self.cfg.model.kind == "mask_rcnn" else ("bbox",)

    def meta(self) -> dict:
        return dict(super().meta(), cat_ids=list(self.cat_ids))

    @staticmethod
    def prepare(batch, device) -> tuple:
        images, targets = batch
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        return images, targets, len(images), 0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_set, device, amp_dtype) -> dict:
        """COCO box (and mask) AP over `val_set` (this rank's share; results gathered to every rank)."""
        return self.score(*self.detections(model, val_set, device, amp_dtype))[0]

    @torch.no_grad()
    def detections(self, model: nn.Module, val_set, device, amp_dtype) -> tuple[list[dict], list[int]]:
        """The COCO result entries of `val_set` and the ids of the images they are of (gathered to every rank)."""
        model.eval()
        results, image_ids = [], []
        for images, targets in self.loader(val_set):
            with autocast(device, amp_dtype):
                outputs = model([im.to(device) for im in images])
            for out, t in zip(outputs, targets):
                results += to_coco_results(out, t["image_id"], self.cat_ids)  # it casts (labels stay integers)
                image_ids.append(t["image_id"])
        return dist.all_gather_lists(results), dist.all_gather_lists(image_ids)

    def score(self, results: list[dict], image_ids: list[int]) -> tuple[dict, dict]:
        """`evaluate`'s numbers of these detections, and `coco_evaluate`'s whole answer (per category too)."""
        types = self.iou_types()
        ev = coco_evaluate(self.coco, results, sorted(image_ids), types)
        metrics = {f"{t}_{k}": v for t in types for k, v in ev[t].items() if k in ("AP", "AP50", "AP75")}
        return dict(metrics, images=len(image_ids), detections=len(results), summary=ev["summary"]), ev

    # --- validate, predict, export ------------------------------------------------------------------------------
    @staticmethod
    def validate_options(p) -> None:
        """`validate`'s own options, after the data's."""
        p.add_argument(
            "--coco-results", help="write the detections as a COCO results JSON (bbox; segm as RLE) for COCO.loadRes"
        )

    def validate(self, model: nn.Module, val_set, device, amp_dtype, args, names) -> tuple[dict, list[str]]:
        """`validate`'s numbers by setting (one: single-scale) and their per-category tables; `--coco-results`."""
        detections, image_ids = self.detections(model, val_set, device, amp_dtype)
        metrics, ev = self.score(detections, image_ids)
        per_category = res.per_category(ev, self.cat_ids, names)
        if args.coco_results:
            atomic_write_text(args.coco_results, json.dumps(detections))  # a COCO results file, for COCO.loadRes
        return {"single-scale": dict(metrics, per_category=per_category)}, [res.per_category_text(per_category)]

    @staticmethod
    def predict_options(p) -> None:
        p.add_argument(
            "--score-threshold",
            type=float,
            default=0.5,
            help="draw and list in predictions.json the detections scoring this (results.json holds them all)",
        )
        p.add_argument(
            "--coco-json",
            help="COCO JSON listing the inputs: image ids by file name (default: the file name's number, as COCO's "
            "000000000139.jpg, else the input's place from 1)",
        )

    @staticmethod
    def predictor(args, meta: dict, paths: list[Path]):
        """`(each, finish)`: `each(model, path, image, x, picture)` gives an image's picture and predictions.json
        record; `finish(folder)` writes what comes after predictions.json and names all it wrote."""
        names, cat_ids, coco_results = meta["class_names"], meta["cat_ids"], []
        ids = dict(zip(paths, res.image_ids(paths, args.coco_json)))

        def each(model, path, img, x, picture):
            o = {k: v.float().cpu() for k, v in model([x])[0].items()}
            entries = to_coco_results(o, ids[path], cat_ids)  # every detection: what validate scores
            coco_results.extend(entries)
            keep = o["scores"] >= args.score_threshold
            dets = [
                dict(label=names[int(lab) - 1], box=b.tolist(), **e)
                for b, lab, e, k in zip(o["boxes"], o["labels"], entries, keep.tolist())
                if k
            ]
            record = dict(image=str(path), image_id=ids[path], picture=str(picture), detections=dets)
            return res.draw_detections(img, o, names, args.score_threshold), record

        def finish(out: Path) -> str:
            atomic_write_text(out / "results.json", json.dumps(coco_results))
            return "predictions.json and results.json"

        return each, finish

    @staticmethod
    def export_model(model: nn.Module, meta: dict, args) -> tuple[Path, tuple[int, int]]:
        from mambaout.inference.export import export_detector_onnx

        if args.opset is not None:
            raise ValueError("--opset: the detector exports at opset 11, the one torchvision tests its ONNX path at")
        m = meta["dense_model"]
        hw = (args.img_size or m["min_size"],) * 2
        info = dict(
            {k: meta[k] for k in ("task", "dense_model", "class_names", "cat_ids")},
            model=f"{m['kind']} " + m["backbone"],
            input="images [3, H, W] RGB in [0, 1], one image of any size (resized and normalised inside)",
            output="boxes [N, 4] x1 y1 x2 y2 in input pixels, labels [N] (class_names[label - 1]), scores [N]"
            + (", masks [N, 1, H, W] probabilities" if m["kind"] == "mask_rcnn" else ""),
        )
        return export_detector_onnx(model, args.output, hw, info), hw

    @staticmethod
    def check_export(model: nn.Module, session, hw: tuple[int, int]) -> tuple[float, str, float]:
        """Max abs difference of boxes, scores and masks between the ONNX Runtime `session` and PyTorch on one
        image of H+17 x W+23, what was compared, and the tolerance (boxes are pixels of a resized image);
        ValueError where the outputs differ in count or labels (no number measures that)."""
        x = torch.rand(3, hw[0] + 17, hw[1] + 23)
        with torch.no_grad():
            want = model([x])[0]
        got = dict(zip((o.name for o in session.get_outputs()), session.run(None, {"images": x.numpy()})))
        if len(got["labels"]) != len(want["labels"]) or not np.array_equal(got["labels"], want["labels"].numpy()):
            raise ValueError(
                f"the exported detector gives {len(got['labels'])} detections, PyTorch {len(want['labels'])} (or "
                "other labels) on the same image"
            )
        diffs = [np.abs(got[k] - want[k].numpy()).max() if len(want[k]) else 0.0 for k in want if k in got]
        return float(max(diffs, default=0.0)), f"boxes, scores, masks; a {hw[0] + 17}x{hw[1] + 23} image", 1e-3


class SegmentTask(Task):
    name = "segment"
    metric = "mIoU"
    default_splits = ("training", "validation")
    model_config, create = SegmenterConfig, staticmethod(create_segmenter)
    network, labels_help = "UperNet", "folder of class-index PNG masks"
    validate_help = (
        "mIoU, pixel accuracy (aAcc) and mean class accuracy (mAcc), and per-class IoU and accuracy: "
        "single-scale, and with --flip, --multi-scale also with test-time augmentation"
    )
    predict_help = "segmentation (a colour per class, with a legend) and predictions.json"
    collate = staticmethod(torch.utils.data.default_collate)  # images and masks stacked

    @staticmethod
    def layout(root: Path, split: str) -> tuple[Path, Path]:
        masks = root / "annotations" / split  # ADE20K's layout; COCO's semantic masks: annotations/semantic_<split>
        if not masks.is_dir() and (root / "annotations" / f"semantic_{split}").is_dir():
            masks = root / "annotations" / f"semantic_{split}"
        return root / "images" / split, masks

    def label_map(self, meta: dict | None = None) -> semseg.LabelMap:
        if meta and "label_lut" in meta:  # a trained model's own mapping
            return semseg.LabelMap(np.array(meta["label_lut"], dtype=np.uint8), meta["class_names"])
        d, m = self.cfg.data, self.cfg.model
        categories = d.categories
        if categories and d.data and not Path(categories).is_absolute() and not Path(categories).exists():
            categories = str(Path(d.data) / categories)  # a recipe names it relative to the dataset root
        return semseg.LabelMap.build(m.num_classes, d.reduce_zero_label, categories)

    def train_set(self):
        d = self.cfg.data
        images, masks = self.split_paths(d, train=True)
        self.labels = self.label_map()
        self.class_names = self.labels.class_names
        self.cfg.model.num_classes = len(self.class_names)
        transform = semseg.RandomResizeCrop(tuple(d.scale), d.crop_size, tuple(d.ratio_range), d.hflip)
        return semseg.SegmentationFolder(images, masks, self.labels, transform)

    def eval_dataset(self, images, masks, meta: dict | None = None):
        self.labels = self.label_map(meta) if meta else getattr(self, "labels", None) or self.label_map()
        return semseg.SegmentationFolder(images, masks, self.labels)

    def meta(self) -> dict:
        d = self.cfg.data
        return dict(super().meta(), label_lut=self.labels.lut.tolist(), eval_scale=list(d.scale), eval_flip=d.eval_flip)

    @staticmethod
    def prepare(batch, device) -> tuple:
        images, masks = batch
        return images.to(device, non_blocking=True), masks.to(device, non_blocking=True), len(images), 0

    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_set, device, amp_dtype, infer=None, label_paths=None) -> dict:
        """`ConfusionMatrix.metrics` of `val_set` at the original mask resolution, summed over ranks, and `images`;
        `infer` a `SegmentInference` (default: the data's scale, flipped too with `eval_flip`); `label_paths`: where
        to write each image's class map (`write_label_png`), in `val_set`'s order."""
        model.eval()
        d = self.cfg.data
        infer = infer or semseg.SegmentInference(tuple(d.scale), flip=d.eval_flip)
        conf = semseg.ConfusionMatrix(self.cfg.model.num_classes)
        for n, (image, mask) in enumerate(self.loader(val_set)):
            classes = infer(model, image[0].to(device), amp_dtype).argmax(0).cpu()
            conf.update(classes, mask[0])
            if label_paths is not None:
                res.write_label_png(label_paths[n], classes)
        counts = dist.all_reduce_sum(conf.counts.flatten().double().tolist() + [len(val_set)], device)
        conf.counts = torch.tensor(counts[:-1], dtype=torch.float64).round().long().reshape(conf.counts.shape)
        return dict(conf.metrics(), images=int(counts[-1]))

    def describe(self, metrics: dict) -> str:
        """The numbers as the log shows them; mIoU, aAcc and mAcc (percent) with their % sign."""
        return "  ".join(
            f"{k} {v:.2f}%" if k in ("mIoU", "aAcc", "mAcc") else f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in metrics.items()
        )

    # --- validate, predict, export ------------------------------------------------------------------------------
    @staticmethod
    def validate_options(p) -> None:
        """The test-time augmentation of `validate` (each setting a row of its own) and `predict` (averaged)."""
        p.add_argument("--flip", action="store_true", help="the mirror image too, its probabilities averaged in")
        p.add_argument(
            "--multi-scale",
            action="store_true",
            help="the scale times each of --ratios, with the flip, averaged (the paper's multi-scale column)",
        )
        p.add_argument(
            "--ratios", type=float, nargs="+", help="--multi-scale's ratios (default 0.5 0.75 1.0 1.25 1.5 1.75)"
        )
        p.add_argument(
            "--slide",
            type=int,
            nargs="+",
            metavar=("WINDOW", "STRIDE"),
            help="sliding-window inference: square windows of WINDOW px every STRIDE px (default 2/3 of the window; "
            "ConvNeXt's ADE20K setting: 512 341)",
        )
        p.add_argument("--label-dir", help="also write each class map (validate: the last row's) as a PNG of indices")

    predict_options = validate_options

    @staticmethod
    def check_options(args, validate: bool) -> None:
        if args.ratios and not args.multi_scale:
            raise ValueError("--ratios applies to --multi-scale; add --multi-scale")
        semseg.SegmentInference.of(args, (1, 1), False)  # checks --slide
        if validate and args.label_dir and Path(args.label_dir).exists() and not Path(args.label_dir).is_dir():
            raise ValueError(f"--label-dir {args.label_dir} is not a folder")

    def validate(self, model: nn.Module, val_set, device, amp_dtype, args, names) -> tuple[dict, list[str]]:
        """`validate`'s numbers by setting (single-scale, flip, multi-scale), their per-class tables; `--label-dir`."""
        scale = tuple(self.cfg.data.scale)
        settings = [semseg.SegmentInference.of(args, scale, False)]
        if args.flip:
            settings.append(semseg.SegmentInference.of(args, scale, True))
        if args.multi_scale:
            settings.append(semseg.SegmentInference.of(args, scale, True, args.ratios or semseg.MULTI_SCALE_RATIOS))
        paths = None
        if args.label_dir:
            label_dir = Path(args.label_dir)
            label_dir.mkdir(parents=True, exist_ok=True)
            paths = list(res.picture_paths(res.dataset_paths(val_set), label_dir, "png").values())
        results, tables = {}, []
        for i, setting in enumerate(settings):
            m = self.evaluate(model, val_set, device, amp_dtype, setting, paths if i == len(settings) - 1 else None)
            per_class = res.per_class(m, names)
            numbers = {k: v for k, v in m.items() if k not in ("iou", "acc")}
            results[setting.describe()] = dict(numbers, per_class=per_class)
            tables.append(f"{setting.describe()} " + res.per_class_text(per_class))
        if paths is not None:
            print(f"{count(len(paths), 'label PNG')} (class indices 0-{len(names) - 1}) in {label_dir}")
        return results, tables

    @staticmethod
    def predictor(args, meta: dict, paths: list[Path]):
        """As `DetectTask.predictor`: each image's coloured class map, its record the share of each class."""
        names = meta["class_names"]
        ratios = (args.ratios or semseg.MULTI_SCALE_RATIOS) if args.multi_scale else (1.0,)
        infer = semseg.SegmentInference.of(args, meta["eval_scale"], args.flip or args.multi_scale, ratios)
        labels = res.picture_paths(paths, Path(args.label_dir), "png") if args.label_dir else None
        if labels:
            Path(args.label_dir).mkdir(parents=True, exist_ok=True)

        def each(model, path, img, x, picture):
            classes = infer(model, x).argmax(0).cpu()
            if labels:
                res.write_label_png(labels[path], classes)
            counts = torch.bincount(classes.flatten(), minlength=len(names))
            share = {names[i]: round(c / classes.numel(), 4) for i, c in enumerate(counts.tolist()) if c}
            share = dict(sorted(share.items(), key=lambda kv: -kv[1]))
            record = dict(image=str(path), picture=str(picture), class_fractions=share)
            return res.draw_segmentation(img, classes, names), record

        return each, lambda out: "predictions.json"

    @staticmethod
    def export_model(model: nn.Module, meta: dict, args) -> tuple[Path, tuple[int, int]]:
        from mambaout.inference.export import DEFAULT_OPSET, check_opset, export_onnx

        size = args.img_size or int(meta["eval_scale"][1])
        info = dict(
            {k: meta[k] for k in ("task", "dense_model", "class_names", "label_lut", "eval_scale")},
            model="upernet " + meta["dense_model"]["backbone"],
            eval_config={"input_size": [3, size, size]},
            input=f"input [batch, 3, {size}, {size}] RGB in [0, 1] (ImageNet mean/std applied inside)",
            output=f"logits [batch, {len(meta['class_names'])}, {size}, {size}]: argmax is the class index",
        )
        path = export_onnx(model, args.output, size, check_opset(args.opset or DEFAULT_OPSET), metadata=info)
        return path, (size, size)

    @staticmethod
    def check_export(model: nn.Module, session, hw: tuple[int, int]) -> tuple[float, str, float]:
        """As `DetectTask.check_export`, on the logits of a batch of 3 at the exported size."""
        x = torch.rand(3, 3, *hw)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        return (got - want).abs().max().item(), "logits, batch 3", 1e-4


PROGRESS_EVERY_S = 10.0  # a long evaluation says how far it got at most this often (`Task.loader`)


TASKS = {task.name: task for task in (DetectTask, SegmentTask)}


def make_task(cfg: RunConfig) -> Task:
    return TASKS[cfg.task](cfg)


__all__ = ["DetectTask", "SegmentTask", "TASKS", "Task", "make_task", "train"]
