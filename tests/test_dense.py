"""Dense prediction (mambaout.dense): the backbone's exactness, COCO AP and mIoU against independent numbers, the
resize-and-flip data path, and the detect/segment commands end to end on coco128-dense (tiny settings)."""

import csv
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA

import mambaout
from mambaout.dense.backbone import DenseBackbone

pycocotools = pytest.importorskip("pycocotools", reason="dense tests need pycocotools: pip install 'mambaout[dense]'")
from pycocotools import mask as mask_util  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from mambaout.cli import detect as cmd_detect  # noqa: E402
from mambaout.cli import segment as cmd_segment  # noqa: E402
from mambaout.dense.coco import CocoInstances, ResizeFlip, coco_evaluate, resize, resize_scale, to_coco_results  # noqa: E402
from mambaout.dense.semseg import ConfusionMatrix, LabelMap, SegmentationFolder  # noqa: E402

TAR = "coco128-dense.tar"


@pytest.fixture(scope="session")
def coco128(tmp_path_factory):
    """coco128-dense extracted once per session (from ../shared/data or $MAMBAOUT_SHARED_DATA); skips when absent."""
    if not (SHARED_DATA / TAR).is_file():
        pytest.skip(f"{TAR} not found in {SHARED_DATA}; set MAMBAOUT_SHARED_DATA to the folder holding it")
    out = tmp_path_factory.mktemp("coco128")
    with tarfile.open(SHARED_DATA / TAR) as tar:
        tar.extractall(out, filter="data")
    return out / "coco128-dense"


def _val(root, masks=True, transform=None):
    return CocoInstances(root / "images/val2017", root / "annotations/instances_val2017.json", transform, masks)


# --- the backbone ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mambaout_test", pytest.param("mambaout_femto", marks=pytest.mark.slow)])
def test_backbone_stage_maps_equal_features_only_bit_for_bit(name, tmp_path):
    torch.manual_seed(0)
    ckpt = mambaout.save_weights(mambaout.create_model(name), tmp_path / "w.safetensors", model=name)
    dense = DenseBackbone(name, checkpoint=ckpt).eval()
    ref = mambaout.create_model(name, checkpoint=ckpt, features_only=True).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, theirs, normed = dense.stage_maps(x), ref(x), dense(x)
        for a, b, n, c in zip(ours, theirs, normed, dense.out_channels):
            assert torch.equal(a, b)
            # the added norm: a LayerNorm over channels with fresh (1, 0) affine, computed here by hand
            mu, var = b.mean(1, keepdim=True), b.var(1, unbiased=False, keepdim=True)
            torch.testing.assert_close(n, (b - mu) / torch.sqrt(var + 1e-6), atol=1e-5, rtol=1e-4)
            assert n.shape[1] == c
        # any size: padded at the bottom and right to a multiple of 32
        odd = torch.randn(1, 3, 70, 100)
        padded = F.pad(odd, (0, 28, 0, 26))
        for a, b in zip(dense.stage_maps(odd), ref(padded)):
            assert torch.equal(a, b)
        assert [tuple(f.shape[-2:]) for f in dense(odd)] == [(24, 32), (12, 16), (6, 8), (3, 4)]


def test_backbone_frozen_stages_drop_path_and_selected_stages():
    bb = DenseBackbone("mambaout_test", drop_path_rate=0.3, frozen_stages=1, out_indices=(1, 3))
    assert not any(p.requires_grad for p in bb.body.stem.parameters())
    assert not any(p.requires_grad for p in bb.body.stages[0].parameters())
    assert all(p.requires_grad for p in bb.body.stages[1].parameters())
    bb.train()
    assert not bb.body.stages[0].training and bb.body.stages[1].training
    assert bb.body.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert bb.out_channels == [32, 64] and len(bb(torch.randn(1, 3, 64, 64))) == 2
    with pytest.raises(ValueError, match="frozen_stages"):
        DenseBackbone("mambaout_test", frozen_stages=7)


# --- evaluation ------------------------------------------------------------------------------------------------------


N_IMAGES = 40  # the first 40 validation images: mask decoding dominates these tests' time


def _gt_outputs(dataset, perturb=None):
    """Each image's ground truth as a detector's output (score 1), optionally perturbed per instance."""
    results, ids = [], []
    for i in range(N_IMAGES):
        _, t = dataset[i]
        out = dict(boxes=t["boxes"].clone(), labels=t["labels"], scores=torch.ones(len(t["labels"])))
        out["masks"] = t["masks"]
        if perturb is not None:
            out = perturb(out)
        results += to_coco_results(out, t["image_id"], dataset.cat_ids)
        ids.append(t["image_id"])
    return results, ids


def test_ground_truth_as_predictions_scores_one(coco128):
    ds = _val(coco128)
    results, ids = _gt_outputs(ds)
    ev = coco_evaluate(ds.coco, results, ids)
    assert ev["bbox"]["AP"] == pytest.approx(1.0) and ev["segm"]["AP"] == pytest.approx(1.0)
    seg = SegmentationFolder(
        coco128 / "images/val2017",
        coco128 / "annotations/semantic_val2017",
        LabelMap.build(None, True, coco128 / "annotations/semantic_categories.json"),
    )
    conf = ConfusionMatrix(133)
    for i in range(0, len(seg), 10):
        _, mask = seg[i]
        conf.update(mask, mask)
    m = conf.metrics()
    assert m["mIoU"] == pytest.approx(100.0) and m["aAcc"] == pytest.approx(100.0) and m["classes"] > 20


def _shift_and_drop():
    """Shift boxes 6 px right, masks 6 px right (rolled), drop every third instance, score by position."""

    def perturb(out):
        keep = [i for i in range(len(out["labels"])) if i % 3 != 2]
        boxes = out["boxes"][keep] + torch.tensor([6.0, 0.0, 6.0, 0.0])
        masks = torch.roll(out["masks"][keep], 6, dims=-1)
        scores = torch.tensor([1.0 / (1 + i) for i in keep])
        return dict(boxes=boxes, labels=out["labels"][keep], scores=scores, masks=masks)

    return perturb


def test_the_evaluation_loop_scores_ground_truth_outputs_one(coco128):
    # DetectTask.evaluate end to end (loader, the model's outputs as torchvision returns them: float boxes, scores
    # and mask probabilities [N, 1, H, W], int64 labels) with a stand-in model that answers the ground truth
    from mambaout.dense.config import resolve
    from mambaout.dense.tasks import make_task

    overrides = {"data.data": str(coco128), "data.max_val_images": 5, "data.workers": 0, "train.steps": 1}
    cfg = resolve("detect", None, overrides)
    task = make_task(cfg)
    val_set = task.val_set()
    truth = iter([_val(coco128)[i][1] for i in range(5)])

    class GroundTruth(torch.nn.Module):
        def forward(self, images):
            t = next(truth)
            return [
                dict(
                    boxes=t["boxes"],
                    labels=t["labels"],
                    scores=torch.ones(len(t["labels"])),
                    masks=t["masks"][:, None].float(),
                )
            ]

    got = task.evaluate(GroundTruth(), val_set, torch.device("cpu"), None)
    assert got["images"] == 5 and got["detections"] > 5
    assert got["bbox_AP"] == pytest.approx(1.0) and got["segm_AP"] == pytest.approx(1.0)


def test_a_perturbation_gives_what_cocoeval_computes_directly(coco128):
    ds = _val(coco128)
    ours, ids = _gt_outputs(ds, _shift_and_drop())
    got = coco_evaluate(ds.coco, ours, ids)
    # the same perturbation built straight from the JSON, scored by pycocotools with no code of ours in between
    data = json.loads((coco128 / "annotations/instances_val2017.json").read_text())
    per_image = {}
    first = set(sorted(i["id"] for i in data["images"])[:N_IMAGES])
    for a in data["annotations"]:
        if a["image_id"] in first and not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0:
            per_image.setdefault(a["image_id"], []).append(a)
    gt = COCO(str(coco128 / "annotations/instances_val2017.json"))
    direct = []
    for image_id, anns in per_image.items():
        for i, a in enumerate(anns):
            if i % 3 == 2:
                continue
            x, y, w, h = a["bbox"]
            m = np.roll(gt.annToMask(a), 6, axis=1)
            rle = mask_util.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            direct.append(
                dict(
                    image_id=image_id,
                    category_id=a["category_id"],
                    score=1.0 / (1 + i),
                    bbox=[x + 6, y, w, h],
                    segmentation=rle,
                )
            )
    for iou_type in ("bbox", "segm"):
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        ev = COCOeval(gt, gt.loadRes([{k: v for k, v in d.items() if k != drop} for d in direct]), iou_type)
        ev.params.imgIds = sorted(first)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert 0.05 < ev.stats[0] < 0.95
        assert got[iou_type]["AP"] == pytest.approx(ev.stats[0], abs=1e-9)
        assert got[iou_type]["AP50"] == pytest.approx(ev.stats[1], abs=1e-9)


def test_box_ap_of_a_hand_computed_iou(tmp_path):
    # one 10x10 object; the prediction covers its top 6.2 rows: IoU 0.62, a match at IoU 0.50, 0.55 and 0.60 only,
    # so AP over the ten thresholds 0.50:0.95 is 3/10, AP50 is 1 and AP75 is 0
    ann = dict(
        id=1,
        image_id=1,
        category_id=3,
        iscrowd=0,
        bbox=[0, 0, 10, 10],
        area=100.0,
        segmentation=[[0, 0, 10, 0, 10, 10, 0, 10]],
    )
    doc = dict(
        images=[dict(id=1, width=20, height=20, file_name="a.jpg")],
        annotations=[ann],
        categories=[dict(id=3, name="car")],
    )
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    from mambaout.dense.coco import load_coco

    gt = load_coco(tmp_path / "gt.json")
    out = dict(boxes=torch.tensor([[0.0, 0.0, 10.0, 6.2]]), labels=torch.tensor([1]), scores=torch.tensor([0.9]))
    ev = coco_evaluate(gt, to_coco_results(out, 1, [3]), [1], ("bbox",))
    assert ev["bbox"]["AP"] == pytest.approx(0.3) and ev["bbox"]["AP50"] == pytest.approx(1.0)
    assert ev["bbox"]["AP75"] == 0.0


def test_miou_of_a_hand_computed_case():
    target = torch.tensor([[0, 0, 1], [1, 1, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 0]])
    conf = ConfusionMatrix(3)
    conf.update(pred, target)
    m = conf.metrics()
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 1/2; class 2 absent; 3 of 5 pixels right
    assert m["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    assert m["aAcc"] == pytest.approx(60.0) and m["classes"] == 2 and m["pixels"] == 5


def test_label_map_refuses_values_that_are_no_class(tmp_path):
    lm = LabelMap.build(3, True, None)
    assert lm(np.array([0, 1, 3, 255]), "m").tolist() == [255, 0, 2, 255]
    with pytest.raises(ValueError, match=r"m.png holds mask values \[4\]"):
        lm(np.array([1, 4]), "m.png")


# --- the data path ---------------------------------------------------------------------------------------------------


def test_resized_and_flipped_boxes_and_masks_cover_the_same_pixels(coco128):
    plain = _val(coco128)
    moved = _val(coco128, transform=ResizeFlip([200], 300, hflip=1.0))
    checked = 0
    for i in (0, 3, 7):
        image, t = plain[i]
        image2, t2 = moved[i]
        h, w = image.shape[-2:]
        h2, w2 = image2.shape[-2:]
        assert (h2, w2) == (int(h * resize_scale(h, w, 200, 300)), int(w * resize_scale(h, w, 200, 300)))
        # draw the moved labels back onto the original image: unflip, then scale up
        back_masks = F.interpolate(t2["masks"].flip(-1)[None].float(), size=(h, w), mode="nearest")[0] > 0
        b = t2["boxes"]
        back_boxes = torch.stack([w2 - b[:, 2], b[:, 1], w2 - b[:, 0], b[:, 3]], 1) * torch.tensor(
            [w / w2, h / h2, w / w2, h / h2]
        )
        torch.testing.assert_close(back_boxes, t["boxes"], atol=0.01, rtol=0)
        # every pixel where the drawn-back mask and the original disagree lies on the original's outline, within
        # the one-pixel quantisation of the smaller grid (r original pixels); a flip or shift would leave the band
        r = int(np.ceil(w / w2)) + 1
        for m0, m1 in zip(t["masks"].bool(), back_masks):
            if m0.sum() < 400:
                continue
            grown = F.max_pool2d(m0[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0
            shrunk = -F.max_pool2d(-m0[None, None].float(), 2 * r + 1, 1, r)[0, 0] > 0
            assert not ((m0 ^ m1) & ~(grown & ~shrunk)).any()
            assert (m0 & m1).sum() / (m0 | m1).sum() > 0.8
            checked += 1
        # the pixels under each moved mask are the object's pixels: the same mean colour in both images
        for m0, m2 in zip(t["masks"].bool(), t2["masks"].bool()):
            if m0.sum() >= 400:
                assert (image[:, m0].mean(1) - image2[:, m2].mean(1)).abs().max() < 0.03
    assert checked >= 3


def test_resize_keeps_the_detectors_own_rule():
    from torchvision.models.detection.transform import _resize_image_and_masks

    image = torch.rand(3, 123, 457)
    ours, _ = resize(image, None, resize_scale(123, 457, 200, 600))
    theirs, _ = _resize_image_and_masks(image, 200.0, 600.0, None)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


# --- the commands ----------------------------------------------------------------------------------------------------

DET = [
    "--recipe",
    "coco128-detect-cpu",
    "--steps",
    "2",
    "--img-size",
    "128",
    "--max-size",
    "160",
    "--workers",
    "0",
    "--max-val-images",
    "2",
    "--threads",
    "1",
    "--set",
    "model.fpn_channels=32",
    "--set",
    "model.box_head_dim=64",
    "--set",
    "model.mask_head_channels=16",
    "--set",
    "model.rois_per_image=32",
]
SEG = [
    "--recipe",
    "coco128-segment-cpu",
    "--steps",
    "3",
    "--crop-size",
    "64",
    "--scale",
    "128",
    "64",
    "--workers",
    "0",
    "--max-val-images",
    "3",
    "--threads",
    "1",
    "--head-channels",
    "16",
    "--set",
    "model.aux_channels=8",
]


def _rows(run):
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_detect_train_validate_predict(coco128, tmp_path, capsys):
    run = tmp_path / "det"
    assert cmd_detect.main(["train", *DET, "--data", str(coco128), "--output", str(run), "--eval-at-start", "0"]) == 0
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [2] and {"bbox_AP", "segm_AP", "train_loss"} <= set(rows[-1])
    assert rows[-1]["images"] == "2"
    res = tmp_path / "res.json"
    args = ["validate", "--checkpoint", str(run / "last.safetensors"), "--data", str(coco128)]
    assert cmd_detect.main([*args, "--max-val-images", "2", "--results-file", str(res)]) == 0
    got = json.loads(res.read_text())["single-scale"]
    assert got["images"] == 2 and got["bbox_AP"] == pytest.approx(float(rows[-1]["bbox_AP"]), abs=1e-6)
    photos = sorted((coco128 / "images/val2017").glob("*.jpg"))[:2]
    out = tmp_path / "pred"
    pred = ["predict", *map(str, photos), "--checkpoint", str(run / "last.safetensors"), "--output", str(out)]
    assert cmd_detect.main([*pred, "--score-threshold", "0.0"]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in records] == list(map(str, photos))
    assert all((out / f"{p.stem}.jpg").is_file() for p in photos)


def test_segment_train_resume_validate_predict(coco128, tmp_path):
    run = tmp_path / "seg"
    base = ["train", *SEG, "--data", str(coco128), "--output", str(run)]
    assert cmd_segment.main([*base, "--stop-after-steps", "2"]) == 0
    assert [int(r["step"]) for r in _rows(run)] == [0]  # stopped before the end: no final evaluation yet
    assert cmd_segment.main(["train", "--resume", str(run)]) == 0
    rows = _rows(run)
    assert [int(r["step"]) for r in rows] == [0, 3]
    res = tmp_path / "res.json"
    args = ["validate", "--checkpoint", str(run / "last.safetensors"), "--data", str(coco128), "--flip"]
    assert cmd_segment.main([*args, "--max-val-images", "3", "--results-file", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["single-scale"]["mIoU"] == pytest.approx(float(rows[-1]["mIoU"]), rel=1e-5)
    assert got["flip"]["images"] == 3 and got["flip"] != got["single-scale"]  # the flip changes the prediction
    photo = sorted((coco128 / "images/val2017").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    assert cmd_segment.main(["predict", str(photo), "--checkpoint", str(run / "last.safetensors"), "-o", str(out)]) == 0
    rec = json.loads((out / "predictions.json").read_text())[0]
    assert sum(rec["class_fractions"].values()) == pytest.approx(1.0, abs=1e-3)
    from PIL import Image

    w, h = Image.open(photo).size
    assert Image.open(out / f"{photo.stem}.png").size == (2 * w, h)


def test_errors_are_one_line(coco128, tmp_path, capsys):
    assert cmd_detect.main(["train", "--steps", "1", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mambaout detect train: no train data") and len(err.strip().splitlines()) == 1
    ckpt = mambaout.save_weights(mambaout.create_model("mambaout_test"), tmp_path / "c.safetensors")
    assert cmd_segment.main(["validate", "--checkpoint", str(ckpt), "--data", str(coco128)]) == 2
    assert "not a detection or segmentation checkpoint" in capsys.readouterr().err
    assert cmd_detect.main(["train", "--steps", "1", "--epochs", "1"]) == 2
    assert "exactly one of --epochs and --steps" in capsys.readouterr().err
    assert cmd_detect.main(["fly"]) == 2


@pytest.mark.slow
def test_segmentation_learns_on_the_cpu_recipe(coco128, tmp_path):
    run = tmp_path / "learn"
    args = ["train", "--recipe", "coco128-segment-cpu", "--data", str(coco128), "--output", str(run)]
    assert cmd_segment.main(args) == 0  # the recipe as recorded in its header
    rows = _rows(run)
    assert float(rows[-1]["mIoU"]) > float(rows[0]["mIoU"])
    log = (run / "train.log").read_text().splitlines()
    losses = [float(line.split("loss ")[1].split()[0]) for line in log if line.startswith("step ")]
    assert losses[-1] < losses[0]
