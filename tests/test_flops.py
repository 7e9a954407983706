"""`mambaout flops`: our MAC counts against two independent counters, and the paper's Transformer Eq. 6-7."""

import json
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import mambaout
from mambaout.analysis.flops import count_macs, long_sequence_threshold, plot_quadratic_share, transformer_flops
from mambaout.cli import main
from mambaout.models.vit import Block


def _flop_counter_flops(model, x) -> int:
    """torch's own counter on a real forward: convs, matmuls and (on the math SDPA path) attention's bmm."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name,size", [("mambaout_femto", 224), ("mambaout_test", 160), ("mambaout_test", 97)])
def test_conv_linear_macs_match_torch_flop_counter(name, size):
    model = mambaout.create_model(name).eval()
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate and no LayerNorms.
    assert 2 * count_macs(model, size, include_norms=False) == _flop_counter_flops(model, torch.randn(1, 3, size, size))


def test_vit_macs_match_torch_flop_counter_including_attention():
    model = mambaout.create_model("vit_tiny_deit", num_classes=10).eval()
    assert 2 * count_macs(model, 64, include_norms=False) == _flop_counter_flops(model, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name,size", [("mambaout_femto", 224), ("mambaout_test", 128)])
def test_macs_match_fvcore(name, size):
    fvcore_nn = pytest.importorskip("fvcore.nn", reason="fvcore is in the [test] extra")
    model = mambaout.create_model(name).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fv = fvcore_nn.FlopCountAnalysis(model, torch.randn(1, 3, size, size))
        fv.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert count_macs(model, size) == fv.total()  # fvcore's "flops" are MACs, LayerNorm 5 per element


def test_flops_command_reproduces_paper_table(capsys):
    assert main(["flops", "--models", "mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small",
                 "mambaout_base", "--json"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert [r["macs_g"] for r in rows] == [1.16, 1.52, 4.49, 8.96, 15.83]  # paper: 1.2, 1.5, 4.5, 9.0, 15.8
    assert [round(r["macs_g"], 1) for r in rows] == [1.2, 1.5, 4.5, 9.0, 15.8]
    assert [r["params_m"] for r in rows] == [7.30, 9.14, 26.55, 48.49, 84.81]


def test_flops_command_any_resolution_and_patterns(capsys):
    assert main(["flops", "--models", "mambaout_t*", "vit_tiny_deit", "--img-size", "384"]) == 0
    out = capsys.readouterr().out
    assert "MACs@384" in out and "mambaout_tiny" in out and "mambaout_test_ssm" in out and "vit_tiny_deit " in out
    tiny_384 = count_macs(mambaout.create_model("mambaout_tiny"), 384) / 1e9
    assert f"{tiny_384:.2f}" in out
    with pytest.raises(SystemExit):
        main(["flops", "--models", "nothing_like_this"])


@pytest.mark.parametrize("dim,tokens", [(64, 50), (96, 700)])
def test_eq6_matches_torch_flop_counter_on_a_real_block(dim, tokens):
    """Eq. 6 counts exactly what FlopCounterMode counts on a pre-norm ViT block: 2 FLOPs per MAC of the four
    projections, the MLP and the two attention products; both leave out biases, norms, softmax and GELU."""
    block = Block(dim, num_heads=2).eval()
    assert transformer_flops(dim, tokens)["total"] == _flop_counter_flops(block, torch.randn(1, tokens, dim))


def test_eq7_threshold_and_share():
    assert long_sequence_threshold(384) == 2304 and long_sequence_threshold(768) == 4608  # ViT-S, ViT-B
    r = transformer_flops(384, 2304)
    assert r["linear"] == r["quadratic"] and r["quadratic_share"] == 0.5 and not r["long_sequence"]
    assert transformer_flops(384, 2305)["long_sequence"]
    assert transformer_flops(384, 196)["quadratic_share"] == pytest.approx(196 / (6 * 384 + 196))
    with pytest.raises(ValueError, match="positive"):
        transformer_flops(0, 10)


def test_transformer_command_and_plot(tmp_path, capsys):
    png = tmp_path / "share.png"
    assert main(["flops", "--transformer", "--dim", "384", "768", "--tokens", "196", "4608", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "L > 6·D = 2304" in out and "L > 6·D = 4608" in out and "50.0%" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["flops", "--transformer"])  # no --dim


def test_plot_function_writes_file(tmp_path):
    plot_quadratic_share([192], str(tmp_path / "p.png"), max_tokens=5000)
    assert (tmp_path / "p.png").is_file()
