"""What `detect|segment validate|predict` hand out besides the headline numbers (issue 28): COCO results files that
pycocotools reads back to the same AP, per-category AP and per-class IoU/accuracy against independent computations,
segmentation test-time augmentation and sliding windows, label PNGs, and the pictures' legend and labels.

Everything runs on small generated images with stand-in or tiny random models (no shared data)."""

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("pycocotools", reason="dense tests need pycocotools: pip install 'mambaout[dense]'")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from mambaout.cli import dense as cli_dense  # noqa: E402
from mambaout.cli import main  # noqa: E402
from mambaout.dense.results import draw_segmentation, palette, place_labels  # noqa: E402
from mambaout.dense.semseg import ConfusionMatrix, SegmentInference, windows  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on shared cores: two OpenMP threads waiting on each other run them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


H, W = 48, 64
# per image: (x, y, w, h, category id) of each object
OBJECTS = {
    1: [(4, 4, 20, 16, 3), (30, 20, 24, 20, 7)],
    2: [(10, 6, 30, 30, 3)],
    3: [(2, 10, 16, 12, 7), (24, 8, 18, 14, 7), (44, 26, 16, 18, 3)],
    4: [(8, 14, 40, 24, 7)],
}


def _image(path: Path, image_id: int) -> None:
    rng = np.random.default_rng(image_id)
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    arr[0, 0] = image_id  # the stand-in detector reads which image it sees from this pixel
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def det_world(tmp_path_factory):
    w = tmp_path_factory.mktemp("det28")
    (w / "images" / "val").mkdir(parents=True)
    (w / "annotations").mkdir()
    images, anns = [], []
    for iid, objects in OBJECTS.items():
        _image(w / "images" / "val" / f"{iid:012d}.png", iid)
        images.append(dict(id=iid, file_name=f"{iid:012d}.png", width=W, height=H))
        for x, y, bw, bh, cat in objects:
            poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            anns.append(
                dict(id=len(anns) + 1, image_id=iid, category_id=cat, iscrowd=0, bbox=[x, y, bw, bh])
                | dict(area=float(bw * bh), segmentation=poly)
            )
    doc = dict(images=images, annotations=anns, categories=[dict(id=3, name="car"), dict(id=7, name="bus")])
    (w / "annotations" / "instances_val.json").write_text(json.dumps(doc))
    return w


class StandInDetector(torch.nn.Module):
    """Answers each image's ground truth moved by a fraction of a pixel per object (a different IoU each), with a
    false positive, scores falling with the object's place: AP strictly between 0 and 1, from no code of ours."""

    def forward(self, images):
        outs = []
        for x in images:
            iid = round(x[0, 0, 0].item() * 255)
            boxes, labels, scores, masks = [], [], [], []
            for k, (bx, by, bw, bh, cat) in enumerate(OBJECTS[iid]):
                dx = 1.37 * (k + iid)  # not a multiple of 0.1: the boxes must not be rounded on the way out
                boxes.append([bx + dx, by, bx + bw + dx, by + bh])
                labels.append(1 if cat == 3 else 2)
                scores.append(0.9 / (1 + k))
                m = torch.zeros(1, H, W)
                m[0, by : by + bh, int(bx + dx) : int(bx + bw + dx)] = 1.0
                masks.append(m)
            boxes.append([0.0, 0.0, 10.0, 10.0])  # nothing there
            labels.append(1)
            scores.append(0.55)
            masks.append(torch.zeros(1, H, W))
            outs.append(
                dict(
                    boxes=torch.tensor(boxes),
                    labels=torch.tensor(labels),
                    scores=torch.tensor(scores),
                    masks=torch.stack(masks),
                )
            )
        return outs


def _stand_in_detector(monkeypatch):
    from mambaout.dense.detection import DetectorConfig

    meta = dict(
        task="detect",
        dense_model=dataclasses.asdict(DetectorConfig(backbone="mambaout_test", num_classes=2)),
        class_names=["car", "bus"],
        cat_ids=[3, 7],
        val_split="val",
    )
    monkeypatch.setattr(cli_dense, "_load", lambda task, path, device: (StandInDetector().eval(), meta))


def _cocoeval(gt: COCO, results: str | list, iou_type: str, cat_ids=None) -> COCOeval:
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev


def test_detect_results_json_round_trips_through_cocoeval(det_world, tmp_path, monkeypatch, capsys):
    _stand_in_detector(monkeypatch)
    ann = det_world / "annotations" / "instances_val.json"
    coco_results, numbers = tmp_path / "dets.json", tmp_path / "numbers.json"
    args = ["detect", "validate", "--checkpoint", "x", "--data", str(det_world), "--val-split", "val"]
    assert main([*args, "--coco-results", str(coco_results), "--results-file", str(numbers)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(numbers.read_text())["single-scale"]
    gt = COCO(str(ann))
    for iou_type in ("bbox", "segm"):
        ev = _cocoeval(gt, str(coco_results), iou_type)  # pycocotools alone, from the file validate wrote
        assert 0.05 < ev.stats[0] < 0.95
        assert got[f"{iou_type}_AP"] == pytest.approx(ev.stats[0], abs=1e-12)
        assert f"{iou_type}_AP {ev.stats[0]:.4g}" in printed
        # per category: COCOeval restricted to that one category gives its AP
        for cat, name in ((3, "car"), (7, "bus")):
            one = _cocoeval(gt, str(coco_results), iou_type, [cat]).stats[0]
            assert got["per_category"][iou_type][name] == pytest.approx(100 * one, abs=1e-9)
            assert re.search(rf"{name} +\| +{100 * one:.3f}", printed)
    assert "Per-category bbox AP:" in printed and "Per-category segm AP:" in printed

    # predict writes the same detections: loadRes gives the same AP, ids from the COCO file or COCO's file names
    out = tmp_path / "pred"
    photos = sorted(str(p) for p in (det_world / "images" / "val").iterdir())
    assert main(["detect", "predict", *photos, "--checkpoint", "x", "-o", str(out), "--score-threshold", "0.6"]) == 0
    entries = json.loads((out / "results.json").read_text())
    assert {e["image_id"] for e in entries} == set(OBJECTS)
    for iou_type in ("bbox", "segm"):
        ev = _cocoeval(gt, str(out / "results.json"), iou_type)
        assert got[f"{iou_type}_AP"] == pytest.approx(ev.stats[0], abs=1e-12)
    records = json.loads((out / "predictions.json").read_text())
    first = records[0]["detections"][0]
    assert first["category_id"] == 3 and first["image_id"] == 1 and first["bbox"][0] == pytest.approx(4 + 1.37)
    assert first["box"][0] == pytest.approx(4 + 1.37) and "counts" in first["segmentation"]
    assert all(d["score"] >= 0.6 for r in records for d in r["detections"])  # the threshold picks what is listed
    assert sum(len(r["detections"]) for r in records) < len(entries)
    assert all((out / f"{Path(p).stem}.png").is_file() for p in photos)  # PNG, as segment predict writes


def test_masks_encode_before_any_coco_file_is_read(monkeypatch):
    # predict reads no COCO file, so nothing has imported the submodule pycocotools.mask when the first mask is
    # encoded: as in a fresh process, take it away here
    import sys

    import pycocotools
    from pycocotools import mask as mask_util

    from mambaout.dense.coco import to_coco_results

    monkeypatch.delitem(sys.modules, "pycocotools.mask")
    monkeypatch.delattr(pycocotools, "mask")
    m = torch.zeros(1, 1, 4, 5)
    m[..., 1:3, 2:] = 1
    out = dict(boxes=torch.tensor([[2.0, 1.0, 5.0, 3.0]]), labels=torch.tensor([1]), scores=torch.tensor([0.5]))
    rle = to_coco_results(dict(out, masks=m), 9, [3])[0]["segmentation"]
    assert np.array_equal(mask_util.decode(dict(rle, counts=rle["counts"].encode())), m[0, 0].numpy())


def test_predict_takes_image_ids_from_a_coco_file(det_world, tmp_path, monkeypatch, capsys):
    _stand_in_detector(monkeypatch)
    doc = json.loads((det_world / "annotations" / "instances_val.json").read_text())
    for im in doc["images"]:
        im["id"] += 100
    (tmp_path / "ids.json").write_text(json.dumps(doc))
    photo = str(det_world / "images" / "val" / f"{2:012d}.png")
    args = ["detect", "predict", photo, "--checkpoint", "x", "-o", str(tmp_path / "o")]
    assert main([*args, "--coco-json", str(tmp_path / "ids.json")]) == 0
    assert {e["image_id"] for e in json.loads((tmp_path / "o" / "results.json").read_text())} == {102}
    # one image: one picture, in the singular
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == f"1 picture and predictions.json and results.json in {tmp_path / 'o'}"
    )
    doc["images"] = doc["images"][:1]
    (tmp_path / "one.json").write_text(json.dumps(doc))
    assert main([*args, "--coco-json", str(tmp_path / "one.json")]) == 2
    assert "lists no image named 000000000002.png" in capsys.readouterr().err


# --- segmentation ----------------------------------------------------------------------------------------------------


def test_per_class_iou_and_accuracy_of_a_hand_computed_case():
    from mambaout.dense.results import per_class, per_class_text

    conf = ConfusionMatrix(4)
    conf.update(torch.tensor([[0, 1, 2, 2], [1, 2, 0, 0]]), torch.tensor([[0, 1, 1, 2], [2, 2, 255, 0]]))
    m = conf.metrics()
    # truth/prediction counts: class 0: 2 true, 2 predicted, 2 right -> IoU 2/2, Acc 2/2; class 1: 2 true, 2
    # predicted, 1 right -> IoU 1/3, Acc 1/2; class 2: 3 true, 3 predicted, 2 right -> IoU 2/4, Acc 2/3; class 3: none
    assert m["mAcc"] == pytest.approx(100 * (1 + 1 / 2 + 2 / 3) / 3)
    assert m["mIoU"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2) / 3) and m["aAcc"] == pytest.approx(500 / 7)
    table = per_class(m, ["a", "b", "c", "d"])
    assert table["a"] == pytest.approx(dict(IoU=100.0, Acc=100.0))
    assert table["b"] == pytest.approx(dict(IoU=100 / 3, Acc=50.0))
    assert table["c"] == pytest.approx(dict(IoU=50.0, Acc=200 / 3))
    assert table["d"] == dict(IoU=None, Acc=None)  # in neither the truth nor the prediction
    assert re.search(r"b +\| +33\.333 \| +50\.000", per_class_text(table))


def test_class_names_from_files_cannot_write_to_the_terminal():
    from mambaout.dense.results import per_category_text, per_class_text

    name = "red\x1b[31m\nline"  # a category name of a COCO JSON, a categories file or a checkpoint
    seg = per_class_text({name: dict(IoU=50.0, Acc=None), "b": dict(IoU=None, Acc=None)})
    det = per_category_text({"bbox": {name: 12.5, "b": None}})
    for text in (seg, det):
        assert "\x1b" not in text and "red\\x1b[31m\\nline" in text
    assert re.search(r"red\\x1b\[31m\\nline +\| +50\.000 \| +-", seg)  # the row whole: the newline escaped
    assert re.search(r"red\\x1b\[31m\\nline +\| +12\.500", det)
    assert len(seg.splitlines()) == 4  # header, rule, two rows


def _segmenter(seed=0):
    from mambaout.dense.upernet import SegmenterConfig, create_segmenter

    torch.manual_seed(seed)
    cfg = SegmenterConfig(backbone="mambaout_test", num_classes=3, channels=8, aux_channels=0, norm="gn")
    model = create_segmenter(cfg).eval()
    with torch.no_grad():  # PyTorch's default conv init and a bias per class: maps of all three classes
        model.head.classifier.reset_parameters()
        model.head.classifier.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    return model, cfg


@pytest.fixture(scope="module")
def seg_world(tmp_path_factory):
    w = tmp_path_factory.mktemp("seg28")
    rng = np.random.default_rng(1)
    for i, (h, w_) in enumerate([(48, 64), (40, 56), (64, 48)]):
        (w / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (w / "annotations" / "validation").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w_, 3), dtype=np.uint8)
        arr[:, : w_ // 2] //= 3  # a dark left half: something for the classes to follow
        Image.fromarray(arr).save(w / "images" / "validation" / f"{i}.png")
        mask = np.zeros((h, w_), np.uint8)
        mask[:, w_ // 2 :] = 1
        mask[h // 2 :, : w_ // 3] = 2
        mask[:3] = 255
        Image.fromarray(mask, mode="L").save(w / "annotations" / "validation" / f"{i}.png")
    return w


def _stand_in_segmenter(monkeypatch, scale=(64, 48)):
    from mambaout.dense.semseg import LabelMap

    model, cfg = _segmenter()
    meta = dict(
        task="segment",
        dense_model=dataclasses.asdict(cfg),
        class_names=["dark", "bright", "corner"],
        label_lut=LabelMap.build(3, False, None).lut.tolist(),
        eval_scale=list(scale),
        val_split="validation",
    )
    monkeypatch.setattr(cli_dense, "_load", lambda task, path, device: (model, meta))
    return model


def _by_hand(model, image: torch.Tensor, ratios, flip: bool, scale=(64, 48)) -> torch.Tensor:
    """Multi-scale + flip as mmseg's aug test: resize to the scale times each ratio (the image fitted inside
    long x short, aspect kept, rounded), softmax, the mirror's softmax mirrored back, all averaged at full size."""
    h, w = image.shape[-2:]
    total = 0
    for r in ratios:
        f = min(int(scale[0] * r) / max(h, w), int(scale[1] * r) / min(h, w))
        x = F.interpolate(image[None], size=(int(h * f + 0.5), int(w * f + 0.5)), mode="bilinear", align_corners=False)
        with torch.no_grad():
            p = model(x).softmax(1)
            if flip:
                p = (p + model(x.flip(-1)).softmax(1).flip(-1)) / 2
        total = total + F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)[0]
    return total / len(ratios)


def test_segment_validate_tta_per_class_and_label_pngs(seg_world, tmp_path, monkeypatch, capsys):
    model = _stand_in_segmenter(monkeypatch)
    labels, numbers = tmp_path / "labels", tmp_path / "numbers.json"
    args = ["segment", "validate", "--checkpoint", "x", "--data", str(seg_world), "--flip", "--multi-scale"]
    assert main([*args, "--label-dir", str(labels), "--results-file", str(numbers)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(numbers.read_text())
    assert list(got)[1:] == ["single-scale", "flip", "multi-scale+flip"]
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    for name, rs, flip in (("single-scale", (1.0,), False), ("flip", (1.0,), True), ("multi-scale+flip", ratios, True)):
        conf = np.zeros((3, 3), np.int64)  # a confusion matrix by hand
        for i in range(3):
            image = torch.from_numpy(np.array(Image.open(seg_world / "images/validation" / f"{i}.png"))).float()
            pred = _by_hand(model, image.permute(2, 0, 1) / 255, rs, flip).argmax(0).numpy()
            mask = np.asarray(Image.open(seg_world / "annotations/validation" / f"{i}.png")).astype(np.int64)
            keep = mask != 255
            np.add.at(conf, (mask[keep], pred[keep]), 1)
            if name == "multi-scale+flip":  # the label PNGs hold the last setting's class maps
                assert np.array_equal(np.asarray(Image.open(labels / f"{i}.png")), pred)
        tp = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - tp
        iou = 100 * tp[union > 0] / union[union > 0]
        acc = 100 * tp / conf.sum(1)
        assert got[name]["mIoU"] == pytest.approx(iou.mean(), abs=1e-9)
        assert got[name]["mAcc"] == pytest.approx(acc.mean(), abs=1e-9)
        assert got[name]["aAcc"] == pytest.approx(100 * tp.sum() / conf.sum(), abs=1e-9)
        per = got[name]["per_class"]
        assert [per[n]["Acc"] for n in ("dark", "bright", "corner")] == pytest.approx(acc.tolist(), abs=1e-9)
        assert f"{name} per-class results:" in printed
    assert got["multi-scale+flip"]["mIoU"] != got["single-scale"]["mIoU"]  # the augmentation changes the answer
    assert f"multi-scale+flip: mIoU {got['multi-scale+flip']['mIoU']:.2f}%" in printed


def test_flip_only_equals_the_hand_computation_and_a_covering_window_equals_the_whole_image():
    # flip-only at the scale is also what training evaluates with (eval_flip)
    model, _ = _segmenter()
    image = torch.rand(3, 40, 56)
    assert torch.equal(SegmentInference((64, 48), flip=True)(model, image), _by_hand(model, image, (1.0,), True))
    whole = SegmentInference((64, 48))(model, image)
    assert torch.equal(SegmentInference((64, 48), window=96, stride=64)(model, image), whole)  # one window: 64x46
    # windows smaller than the image, on a network that sees each pixel alone: the same as the whole image
    pointwise = torch.nn.Conv2d(3, 3, 1)
    slid = SegmentInference((64, 48), window=32, stride=20)(pointwise, image)
    assert torch.allclose(slid, SegmentInference((64, 48))(pointwise, image), atol=1e-6)
    assert not torch.allclose(SegmentInference((64, 48), window=32, stride=20)(model, image), whole, atol=1e-4)


def test_sliding_windows_as_mmseg_places_them():
    # side 100, window 64, stride 48: (100 - 64 + 47) // 48 + 1 = 2 windows, the second moved back to end at 100
    assert windows(100, 64, 48) == [(0, 64), (36, 100)]
    assert windows(50, 64, 48) == [(0, 50)]
    assert windows(512, 512, 341) == [(0, 512)]
    assert windows(683, 512, 341) == [(0, 512), (171, 683)]


def test_tta_settings_are_checked(seg_world, monkeypatch, capsys):
    _stand_in_segmenter(monkeypatch)
    base = ["segment", "validate", "--checkpoint", "x", "--data", str(seg_world)]
    for extra, message in (
        (["--slide", "16"], "--slide window must be >= 32"),
        (["--slide", "64", "80"], "--slide stride must be 1 to the window"),
        (["--multi-scale", "--ratios", "0"], "--ratios must be positive"),
        (["--ratios", "1.5"], "--ratios applies to --multi-scale"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


# --- pictures --------------------------------------------------------------------------------------------------------


def test_the_segmentation_legend_shows_the_colours_of_the_classes_shown():
    names = ["sky", "grass", "road", "car"]
    classes = torch.zeros(30, 40, dtype=torch.int64)
    classes[10:, :] = 2
    classes[20:, 30:] = 3
    picture = draw_segmentation(Image.new("RGB", (40, 30), (128, 128, 128)), classes, names)
    assert picture.width == 80 and picture.height > 30
    legend = np.asarray(picture)[30:].reshape(-1, 3)  # below the photo and the map
    colours = {tuple(c) for c in legend.tolist()}
    for k in (0, 2, 3):
        assert tuple(palette(len(names))[k].tolist()) in colours, names[k]
    assert tuple(palette(len(names))[1].tolist()) not in colours  # grass is in no pixel: no swatch


def test_labels_of_overlapping_boxes_do_not_overlap():
    boxes = [(10, 30, 60, 80)] * 3 + [(12, 31, 50, 70), (0, 0, 20, 20)]
    sizes = [(40, 11)] * 5
    placed = place_labels(boxes, sizes, (100, 100))
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(placed, sizes)]
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[2] <= 100 and 0 <= a[1] and a[3] <= 100
        for b in rects[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert placed[0] == (10, 19)  # the first label sits right above its box


# --- deployment ------------------------------------------------------------------------------------------------------


def _checkpoint(path: Path, model, **meta) -> Path:
    from mambaout.weights.checkpoint import save_weights

    return save_weights(model.state_dict(), path, **meta)


@pytest.mark.heavy  # ~50 s: torch's dynamo exporter on two shared cores
def test_segmenter_exports_to_onnx_equal_to_pytorch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'mambaout[export]'")
    from mambaout.dense.semseg import LabelMap

    model, cfg = _segmenter()
    names = ["dark", "bright", "corner"]
    ckpt = _checkpoint(
        tmp_path / "seg.safetensors",
        model,
        task="segment",
        dense_model=dataclasses.asdict(cfg),
        class_names=names,
        label_lut=LabelMap.build(3, False, None).lut.tolist(),
        eval_scale=[64, 48],
        val_split="validation",
    )
    out = tmp_path / "seg.onnx"
    assert main(["export", "--checkpoint", str(ckpt), str(out), "--check"]) == 0
    assert "max abs diff vs PyTorch (logits, batch 3)" in capsys.readouterr().err
    # ONNX Runtime alone, on an image of the exported size (the scale's shorter side, 48), against the model
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == names and meta["eval_config"]["input_size"] == [3, 48, 48]
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        want = model(x)
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert got.shape == (2, 3, 48, 48) and (got - want).abs().max() < 1e-4
    assert main(["export", "--checkpoint", str(ckpt), str(tmp_path / "s.pt2")]) == 2
    assert "exports as onnx only" in capsys.readouterr().err


def test_detector_exports_by_torchvisions_onnx_path_equal_to_pytorch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install 'mambaout[export]'")
    from mambaout.dense.detection import DetectorConfig, create_detector

    torch.manual_seed(0)
    cfg = DetectorConfig(
        backbone="mambaout_test", num_classes=2, min_size=64, max_size=96, fpn_channels=16, box_head_dim=32
    )
    cfg.mask_head_channels, cfg.rois_per_image = 8, 16
    model = create_detector(cfg).eval()
    names = ["car", "bus"]
    meta = dict(task="detect", dense_model=dataclasses.asdict(cfg), class_names=names, cat_ids=[3, 7])
    ckpt = _checkpoint(tmp_path / "det.safetensors", model, val_split="val", **meta)
    out = tmp_path / "det.onnx"
    assert main(["export", "--checkpoint", str(ckpt), str(out), "--check"]) == 0
    assert "max abs diff vs PyTorch (boxes, scores, masks" in capsys.readouterr().err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores", "masks"]
    x = torch.rand(3, 50, 70)  # another size than the traced 64x64: H and W are dynamic
    with torch.no_grad():
        want = model([x])[0]
    got = dict(zip(["boxes", "labels", "scores", "masks"], session.run(None, {"images": x.numpy()})))
    assert len(want["boxes"]) > 0 and np.array_equal(got["labels"], want["labels"].numpy())
    assert np.abs(got["boxes"] - want["boxes"].numpy()).max() < 1e-3
    assert np.abs(got["scores"] - want["scores"].numpy()).max() < 1e-5
    assert got["masks"].shape == tuple(want["masks"].shape)


# --- the mmseg / mmdet recipe details (issue 28, point 4) ------------------------------------------------------------


def test_class_convs_start_normal_with_std_001_and_zero_bias():
    from mambaout.dense.upernet import SegmenterConfig, create_segmenter

    torch.manual_seed(0)
    cfg = SegmenterConfig(backbone="mambaout_test", num_classes=40, channels=64, aux_channels=32, norm="gn")
    model = create_segmenter(cfg)
    for conv in (model.head.classifier, model.aux.classifier):  # 2560 and 1280 weights: std within a few percent
        assert 0.009 < conv.weight.std().item() < 0.011 and abs(conv.weight.mean().item()) < 0.001
        assert torch.equal(conv.bias, torch.zeros(40))
    # the other convs keep PyTorch's default, uniform with bound 1/sqrt(fan in): std 1/sqrt(3 * 64 * 4 * 9)
    assert model.head.fuse[0].weight.std().item() == pytest.approx((3 * 64 * 4 * 9) ** -0.5, rel=0.05)


def test_crops_are_padded_with_what_normalises_to_zero():
    from mambaout.dense.semseg import RandomResizeCrop

    image, mask = torch.rand(3, 16, 32), torch.ones(16, 32, dtype=torch.int64)
    out, out_mask = RandomResizeCrop((32, 16), 40, (1.0, 1.0), 0.0, 1.0, photometric=False)(image, mask)
    assert out.shape == (3, 40, 40) and torch.equal(out[:, :16, :32], image)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    normalised = (out - mean) / std  # what the segmenter's first line does
    assert normalised[:, 16:].abs().max() < 1e-6 and normalised[:, :, 32:].abs().max() < 1e-6
    assert (out_mask[16:] == 255).all() and (out_mask[:, 32:] == 255).all()


def test_the_category_ratio_check_redraws_crops_one_class_fills():
    from mambaout.dense.semseg import RandomResizeCrop, crop_passes

    def mask(counts):  # a mask holding `counts[k]` pixels of class k (255: ignored)
        return torch.cat([torch.full((n,), k) for k, n in counts.items()])

    assert not crop_passes(mask({0: 80, 1: 20}), 0.75)  # 0.8 of the labelled pixels
    assert crop_passes(mask({0: 70, 1: 30, 255: 500}), 0.75)  # ignored pixels do not count: 0.7
    assert not crop_passes(mask({0: 75, 1: 25}), 0.75)  # mmseg keeps a crop only below the ratio
    assert not crop_passes(mask({2: 100}), 0.75) and not crop_passes(mask({255: 10}), 0.75)  # one class, none
    image, labels = torch.rand(3, 64, 64), torch.zeros(64, 64, dtype=torch.int64)
    labels[:20, :20] = 1  # a small object in a corner: most 24-px crops hold only the background
    passed = {}
    for ratio in (0.75, 1.0):
        random.seed(0)
        crop = RandomResizeCrop((64, 64), 24, (1.0, 1.0), hflip=0.0, cat_max_ratio=ratio)
        passed[ratio] = sum(crop_passes(crop(image, labels)[1], 0.75) for _ in range(60))
    # one draw passes with p ~ 4/60 here; up to 10 draws pass with 1 - (1 - p)^10 ~ 0.5
    assert passed[0.75] >= 25 and passed[1.0] <= 10, passed


def test_training_images_without_annotations_are_left_out(tmp_path):
    from mambaout.dense.coco import CocoInstances

    (tmp_path / "im").mkdir()
    sizes = {1: (48, 64), 2: (48, 64), 3: (20, 64)}  # image 2 has no annotation, image 3 a side under 32 px
    for iid, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "im" / f"{iid}.png")
    box = dict(iscrowd=0, bbox=[2, 2, 10, 10], area=100.0, category_id=3)
    doc = dict(
        images=[dict(id=i, file_name=f"{i}.png", height=h, width=w) for i, (h, w) in sizes.items()],
        annotations=[dict(box, id=1, image_id=1), dict(box, id=2, image_id=3)],
        categories=[dict(id=3, name="car")],
    )
    (tmp_path / "a.json").write_text(json.dumps(doc))
    kept = CocoInstances(tmp_path / "im", tmp_path / "a.json", masks=False, filter_empty=True)
    assert kept.ids == [1] and kept.left_out == 2 and len(kept) == 1
    assert CocoInstances(tmp_path / "im", tmp_path / "a.json", masks=False).ids == [1, 2, 3]  # evaluation keeps all


def test_photometric_distortion_steps_against_colorsys_and_hand_values():
    import colorsys

    from mambaout.dense.semseg import RandomResizeCrop, photometric

    rgb = torch.rand(3, 5, 7)
    rgb[:, 0, 0] = torch.tensor([0.3, 0.3, 0.3])  # grey: no hue
    for saturation, hue in ((1.3, 0.05), (0.6, -0.1), (4.0, 0.0), (1.0, 0.1)):
        out = photometric(rgb, 0.0, 1.0, saturation, hue, True)
        for y, x in ((0, 0), (1, 2), (4, 6), (3, 3)):
            h, s, v = colorsys.rgb_to_hsv(*rgb[:, y, x].tolist())
            want = colorsys.hsv_to_rgb((h + hue) % 1.0, min(s * saturation, 1.0), v)
            assert out[:, y, x].tolist() == pytest.approx(want, abs=1e-6)
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(photometric(red, 0.0, 1.0, 1.0, 1 / 3, True), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1))
    pixel = torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)
    # brightness +0.25, then contrast x2 clipped: (0.75, 0.5, 0.375) * 2 -> (1, 1, 0.75)
    assert photometric(pixel, 0.25, 2.0, 1.0, 0.0, True).flatten().tolist() == pytest.approx([1.0, 1.0, 0.75])
    # saturation x0: the grey of the pixel's value
    assert photometric(pixel, 0.0, 1.0, 0.0, 0.0, False).flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])
    random.seed(3)
    image, mask = torch.rand(3, 32, 32), torch.zeros(32, 32, dtype=torch.int64)
    plain = RandomResizeCrop((32, 32), 32, (1.0, 1.0), 0.0, 1.0, photometric=False)(image, mask)[0]
    assert torch.equal(plain, image)
    crop = RandomResizeCrop((32, 32), 32, (1.0, 1.0), 0.0, 1.0)  # each draw changes the image with p = 15/16
    changed = [not torch.equal(crop(image, mask)[0], image) for _ in range(16)]
    assert sum(changed) >= 12, changed


def test_new_outputs_refuse_what_they_cannot_write_in_one_line(det_world, seg_world, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("the user's")
    _stand_in_segmenter(monkeypatch)
    seg = ["segment", "validate", "--checkpoint", "x", "--data", str(seg_world)]
    assert main([*seg, "--label-dir", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--label-dir" in err and "is not a folder" in err and len(err.strip().splitlines()) == 1
    _stand_in_detector(monkeypatch)
    det = ["detect", "validate", "--checkpoint", "x", "--data", str(det_world), "--val-split", "val"]
    assert main([*det, "--coco-results", str(tmp_path)]) == 2  # a folder
    err = capsys.readouterr().err
    assert "--coco-results" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('{"images": [1, 2')
    photo = str(det_world / "images" / "val" / f"{1:012d}.png")
    assert main(["detect", "predict", photo, "--checkpoint", "x", "-o", str(tmp_path / "o")]) == 0
    assert (
        main(
            [
                "detect",
                "predict",
                photo,
                "--checkpoint",
                "x",
                "-o",
                str(tmp_path / "o"),
                "--coco-json",
                str(tmp_path / "bad.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json is not a COCO instances file" in err[0]
    assert (tmp_path / "file").read_text() == "the user's"
