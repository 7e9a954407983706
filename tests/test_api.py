"""The model API downstream tools call: features, intermediates, heads, checkpointing, compile and export."""

import pytest
import timm
import torch

import mambaout


@pytest.fixture(scope="module")
def femto_pair():
    torch.manual_seed(0)
    ref = timm.create_model("mambaout_femto").eval()
    ours = mambaout.create_model("mambaout_femto").eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_features_only_is_nchw_backbone():
    model = mambaout.create_model("mambaout_tiny", features_only=True).eval()
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        feats = model(x)
    assert model.feature_info.channels() == [96, 192, 384, 576]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    for f, c, r in zip(feats, [96, 192, 384, 576], [4, 8, 16, 32]):
        assert f.shape == (2, c, 128 // r, 160 // r) and f.is_contiguous()


def test_features_only_subset_nhwc_and_pruned():
    model = mambaout.create_model("mambaout_test", features_only=True, out_indices=(1, 2), output_fmt="NHWC")
    assert len(model.stages) == 3  # stage 3 is not needed for indices up to 2
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape for f in feats] == [(1, 8, 8, 32), (1, 4, 4, 48)]


def test_features_match_timm(femto_pair):
    ours, ref = femto_pair
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for fmt in ("NCHW", "NHWC"):
            a = ours.forward_intermediates(x, output_fmt=fmt, intermediates_only=True)
            b = ref.forward_intermediates(x, output_fmt=fmt, intermediates_only=True)
            assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(a, b))
        final, inter = ours.forward_intermediates(x, indices=2)
        assert len(inter) == 2 and torch.allclose(final, ours.forward_features(x))
        early = ours.forward_intermediates(x, indices=[0, -3], stop_early=True, intermediates_only=True)
        assert [f.shape[1] for f in early] == [48, 96]


def test_head_api(femto_pair):
    ours, _ = femto_pair
    feats = ours.forward_features(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 2, 2, 288)
    assert ours.forward_head(feats, pre_logits=True).shape == (2, ours.head_hidden_size) == (2, 1152)
    model = mambaout.create_model("mambaout_test")
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 2, 256)


def test_grad_checkpointing_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = mambaout.create_model("mambaout_test", drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad()
        torch.manual_seed(42)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_a, grads_a = run()
    model.set_grad_checkpointing(True)
    out_b, grads_b = run()
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_param_groups_skip_norms_biases_layer_scale():
    model = mambaout.create_model("mambaout_small_rw")
    no_decay = model.no_weight_decay()
    assert "stages.0.blocks.0.ls.gamma" in no_decay and "stages.0.blocks.0.norm.weight" in no_decay
    assert "stages.0.blocks.0.fc1.bias" in no_decay and "stages.0.blocks.0.fc1.weight" not in no_decay
    decay, rest = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and rest["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_compile_fullgraph():
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # graph capture without codegen: fast on CPU
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-6)


@pytest.mark.heavy
def test_compile_fullgraph_inductor():
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5)


def test_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = mambaout.create_model("mambaout_test").eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}},
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 64, 64)
    got = sess.run(None, {"images": x3.numpy()})[0]
    with torch.no_grad():
        assert abs(got - model(x3).numpy()).max() <= 1e-4
