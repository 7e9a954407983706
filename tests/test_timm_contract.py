"""The contract timm and torchvision apply to their own models, held by ours.

FX tracing (torchvision's feature extractor, symbolic_trace + backward), TorchScript (alone and after FX), timm's
`pretrained_cfg` fields with timm's values, the features factory arguments, pruning, `reset_classifier`,
`FeatureInfo`, and the opt-in `register_timm()`. Variants come from the registry, not from a hand-made list.
"""

import subprocess
import sys

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import mambaout
from mambaout.models.mambaout import LEAF_MODULES, GatedCNNBlock, MambaOut

# The Gated CNN networks (the analysis package's ViT and Mamba-block models have their own builders).
VARIANTS = [n for n in mambaout.list_models("mambaout_*") if mambaout.get_variant(n)[0].group == "mambaout"]
X = torch.randn(1, 3, 64, 64)
# the FX/TorchScript tests: every registered Gated CNN variant


def _model(name, **kwargs):
    torch.manual_seed(0)
    return mambaout.create_model(name, **kwargs)


def _shallow(name, **kwargs):
    """The variant's architecture (widths, stem, norms, ratios, activation, LayerScale) one block deep per stage:
    what tracing and scripting see is the same, and the base-size models build in a fraction of the time."""
    return _model(name, depths=(1, 1, 1, 1), **kwargs)


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_trace_equals_eager_and_backpropagates(name):
    model = _shallow(name, num_classes=5).train()
    graph = torch.fx.symbolic_trace(model)
    x = X.clone().requires_grad_()
    want = model(x)  # autograd on: eager runs the plain block too, so the graph must match bit for bit
    got = graph(x)
    assert torch.equal(got, want)
    got.square().mean().backward()
    assert all(p.grad is not None for p in graph.parameters())
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in op or "gated_dwconv" in op for op in ops), "a fast path leaked into the FX graph"


@pytest.mark.parametrize("name", VARIANTS)
def test_torchscript_and_fx_then_torchscript_equal_eager(name):
    model = _shallow(name).eval()
    want = model(X)  # grad mode on: the plain forward, the one scripting and tracing see
    torch.testing.assert_close(torch.jit.script(model)(X), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.jit.script(torch.fx.symbolic_trace(model))(X), want, rtol=1e-5, atol=1e-5)


def test_torchvision_feature_extractor_gives_the_stage_maps():
    model = _model("mambaout_femto").eval()
    nodes = {f"stages.{i}": f"s{i}" for i in range(4)}
    feats = create_feature_extractor(model, return_nodes=nodes)(X)
    assert [tuple(f.shape) for f in feats.values()] == [(1, 16, 16, 48), (1, 8, 8, 96), (1, 4, 4, 192), (1, 2, 2, 288)]
    assert model.output_fmt == "NHWC"  # what generic consumers read the channel dim from


def test_leaf_modules_make_fx_graphs_match_eager_bit_for_bit_under_no_grad():
    # Without autograd, eager CPU blocks, stems, downsampling layers and heads take fast paths (within 1e-5 of the
    # plain ones). Treating them as leaves, as register_timm() tells timm's tracer to, makes the graph call the same code.
    model = _model("mambaout_femto").eval()
    leaves = create_feature_extractor(
        model, return_nodes={"head": "logits"}, tracer_kwargs=dict(leaf_modules=list(LEAF_MODULES))
    )
    blocks_only = create_feature_extractor(
        model, return_nodes={"head": "logits"}, tracer_kwargs=dict(leaf_modules=[GatedCNNBlock])
    )
    with torch.inference_mode():
        want = model(X)
        assert torch.equal(leaves(X)["logits"], want)
        torch.testing.assert_close(blocks_only(X)["logits"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", mambaout.list_pretrained())
def test_pretrained_cfg_has_timms_fields_and_values(name):
    ours = mambaout.create_model(name, device="meta").pretrained_cfg
    ref = timm.create_model(name, pretrained=False, device="meta").pretrained_cfg if timm.is_model(name) else None
    if ref is None:
        pytest.skip(f"timm has no {name}")
    for key, value in ref.items():
        mine = ours[key]
        assert (tuple(mine) if isinstance(mine, list) else mine) == value, key


def test_default_cfg_output_fmt_and_tag_class_count():
    model = mambaout.create_model("mambaout_base_plus_rw.sw_e150_in12k", device="meta")
    assert model.num_classes == 11821 and model.default_cfg is model.pretrained_cfg
    feats = mambaout.create_model("mambaout_femto", features_only=True, out_indices=(1, 3))
    assert feats.default_cfg["architecture"] == "mambaout_femto" and feats.output_fmt == "NCHW"
    assert feats.feature_info.out_indices == (1, 3) and feats.feature_info.channels() == [96, 288]


def test_forward_features_matches_pool_size_and_head_hidden_size():
    model = _model("mambaout_femto").eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg["input_size"]))
        pre = model.forward_head(feats, pre_logits=True)
        assert list(feats.shape[1:3]) == cfg["pool_size"] and feats.shape[3] == model.num_features
        assert pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model(X).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        assert model(X).shape[1:3] == (2, 2)


def test_features_factory_arguments(tmp_path):
    feats = mambaout.create_model(
        "mambaout_femto",
        features_only=True,
        feature_cls="getter",
        feature_cfg=dict(out_indices=(0, 2), flatten_sequential=True),
        dtype=torch.float64,
        device="cpu",
    )
    outs = feats(X.double())
    assert [o.shape[1] for o in outs] == [48, 192] and outs[0].dtype == torch.float64
    src = _model("mambaout_test")
    path = mambaout.save_weights(src, tmp_path / "w.safetensors")
    loaded = mambaout.create_model("mambaout_test", pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), src.state_dict().values()))
    assert mambaout.create_model("mambaout_test", device="meta").stem.conv1.weight.is_meta


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(features_only=True, feature_cls="hook"), "feature_cls='hook'"),
        (dict(features_only=True, feature_cfg=dict(feature_info="x")), "feature_cfg\\['feature_info'\\]"),
        (dict(not_an_argument=1), "does not take 'not_an_argument'"),
        ({"a:1": 2}, "does not take 'a:1'"),  # a name no Python identifier could be (from --set model_kwargs)
    ],
)
def test_unsupported_factory_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        mambaout.create_model("mambaout_test", **kwargs)
    assert "\n" not in str(info.value)


def test_prune_intermediate_layers():
    model = _model("mambaout_femto").eval()
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert model.num_features == model.head_hidden_size == 96 and model.num_classes == 0
    out = model(X)  # the head is gone: the last kept stage's map
    assert out.shape == (1, 8, 8, 96) and model.forward_head(out, pre_logits=True).shape == out.shape
    assert len(model.stages) == 2 and model.feature_info.channels() == [48, 96]
    with pytest.raises(ValueError, match="prune_head=False keeps a head"):
        _model("mambaout_femto").prune_intermediate_layers([0, 1], prune_head=False)
    keep = _model("mambaout_femto").eval()
    keep.prune_intermediate_layers([0, 3], prune_head=False)  # the last stage stays, so the head fits
    assert keep(X).shape == (1, 1000)


def test_reset_classifier_reset_other():
    model = _model("mambaout_femto").eval()
    model.reset_classifier(7, reset_other=True)
    assert model.head_hidden_size == model.num_features == 288
    assert model(X).shape == (1, 7) and isinstance(model.head.norm, torch.nn.Identity)


def test_feature_info_accessors():
    info = _model("mambaout_femto").feature_info
    assert info.out_indices == (0, 1, 2, 3)
    assert info.channels(1) == 96 and info.reduction([0, 3]) == [4, 32] and info.module_name(2) == "stages.2"
    assert info.get_dicts(keys=("num_chs",), idx=0) == {"num_chs": 48}
    assert len(info.get_dicts()) == 4
    wrapped = timm.models.FeatureInfo(info, len(info))  # what timm's tests build from a model's feature_info
    assert wrapped.channels() == [48, 96, 192, 288]


@pytest.fixture
def registered():
    names = mambaout.register_timm(["mambaout_femto", "mambaout_small_rw"])
    yield names
    mambaout.unregister_timm()


def test_register_timm_routes_timms_factory_to_ours(registered):
    model = timm.create_model("mambaout_femto", num_classes=3).eval()
    assert isinstance(model, MambaOut) and model.num_classes == 3
    assert model.pretrained_cfg["hf_hub_id"] == "timm/mambaout_femto.in1k"
    for feature_cls in (None, "getter"):
        kw = dict(feature_cls=feature_cls) if feature_cls else {}
        feats = timm.create_model("mambaout_small_rw", features_only=True, out_indices=(1, 2), **kw).eval()
        outs = feats(X)
        assert feats.feature_info.channels() == [192, 384]
        axis = 1 if getattr(feats, "output_fmt", "NCHW") == "NCHW" else -1
        assert [o.shape[axis] for o in outs] == [192, 384]
    from timm.models import get_notrace_modules

    assert set(LEAF_MODULES) <= set(get_notrace_modules())
    with torch.inference_mode():  # timm's FX feature extraction calls the leaves: the same fast paths as eager
        torch.manual_seed(0)
        fx_feats = timm.create_model("mambaout_femto", features_only=True, feature_cls="fx").eval()
        torch.manual_seed(0)
        eager = timm.create_model("mambaout_femto", features_only=True).eval()  # the same weights
        assert all(torch.equal(a, b.permute(0, 2, 3, 1) if a.shape != b.shape else b)
                   for a, b in zip(fx_feats(X), eager(X)))  # fmt: skip
    torch.testing.assert_close(torch.jit.script(model)(X), model(X), rtol=1e-5, atol=1e-5)


def test_register_timm_loads_timms_weights_through_timms_loader(registered, tmp_path):
    mambaout.unregister_timm()
    theirs = timm.create_model("mambaout_femto").eval()
    timm_file = tmp_path / "timm_femto.pth"
    torch.save(theirs.state_dict(), timm_file)
    mambaout.register_timm(["mambaout_femto"])
    ours = timm.create_model("mambaout_femto", pretrained=True, pretrained_cfg_overlay=dict(file=str(timm_file)))
    assert isinstance(ours, MambaOut) and type(theirs) is not MambaOut
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(X), theirs(X), rtol=1e-5, atol=1e-5)


def test_unregister_and_no_register_leave_timm_untouched(registered):
    mambaout.unregister_timm()
    assert type(timm.create_model("mambaout_femto")).__module__ == "timm.models.mambaout"
    code = "import mambaout, timm; print(type(timm.create_model('mambaout_femto')).__module__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "timm.models.mambaout", res.stderr


def test_register_timm_rejects_unknown_names():
    with pytest.raises(ValueError, match="has no model"):
        mambaout.register_timm(["mambaout_test"])
