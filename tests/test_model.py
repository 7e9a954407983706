"""The model against its references: timm's implementation, the official checkpoint layout, the paper's counts."""

import pytest
import timm
import torch
from timm.models.mambaout import checkpoint_filter_fn as timm_filter

import mambaout
from mambaout.analysis.flops import count_macs
from mambaout.models.mambaout import MambaOut
from mambaout.models.variants import get_variant
from mambaout.weights.checkpoint import to_model_layout, to_official_layout

# Every variant with published weights is one timm implements too: the parity set comes from the registry.
PARITY = mambaout.list_models(pretrained=True, group="mambaout")
PAPER = [n for n in PARITY if get_variant(n)[0].default_weights.top1_source == "paper Table 1"]
RW = [n for n in PARITY if n not in PAPER]

# Published parameter counts (millions): paper Table 1 and timm's model cards.
PARAMS_M = {
    "mambaout_femto": 7.30,
    "mambaout_kobe": 9.14,
    "mambaout_tiny": 26.55,
    "mambaout_small": 48.49,
    "mambaout_base": 84.81,
    "mambaout_small_rw": 48.50,
    "mambaout_base_short_rw": 88.83,
    "mambaout_base_tall_rw": 86.48,
    "mambaout_base_wide_rw": 94.45,
    "mambaout_base_plus_rw": 101.66,
}
# Paper Table 1 MACs (G) at 224 px, given to one decimal.
PAPER_MACS_G = {
    "mambaout_femto": 1.2,
    "mambaout_kobe": 1.5,
    "mambaout_tiny": 4.5,
    "mambaout_small": 9.0,
    "mambaout_base": 15.8,
}


def test_parity_set_is_every_published_variant():
    assert set(PARITY) == set(PARAMS_M) and set(PAPER) == set(PAPER_MACS_G)  # a new variant needs its published counts


def _pair(name, **kwargs):
    torch.manual_seed(0)
    ref = timm.create_model(name, **kwargs).eval()
    ours = mambaout.create_model(name, **kwargs).eval()
    return ours, ref


# Parity holds at any input size (no layer branches on it): one variant at the paper's 224 px, the others at 64 px,
# where the base models' forwards cost a tenth (their last stage is 2x2 instead of 7x7, the 7x7 conv padded alike).
FULL_SIZE = "mambaout_femto"


@pytest.mark.parametrize("name", PARITY)
def test_logits_equal_timm_and_official_layout(name):
    ours, ref = _pair(name)
    ours.load_state_dict(ref.state_dict(), strict=True)  # timm layout loads as it is
    size = 224 if name == FULL_SIZE else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = ref(x)
        assert (ours(x) - want).abs().max().item() <= 1e-5
        if name in PAPER:
            # The official layout: timm's own filter is the independent reference for the key mapping.
            official = to_official_layout(ref.state_dict())
            assert set(timm_filter(dict(official), ref)) == set(ref.state_dict())
            fresh = mambaout.create_model(name).eval()
            fresh.load_state_dict(to_model_layout(official), strict=True)
            assert (fresh(x) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", PARITY)
def test_param_count_matches_published(name):
    with torch.device("meta"):
        model = MambaOut(**get_variant(name)[0].kwargs)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS_M[name]


@pytest.mark.parametrize("name", PAPER)
def test_macs_match_paper(name):
    # The paper's counts come from fvcore (conv + linear + 5 per LayerNorm element), rounded to 0.1G.
    with torch.device("meta"):
        model = MambaOut(**get_variant(name)[0].kwargs)
    macs = count_macs(model, 224)
    assert round(macs / 1e9, 1) == PAPER_MACS_G[name]
    assert 0.97 * macs < count_macs(model, 224, include_norms=False) < macs


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, conv_ratio=0.5), dict(expansion_ratio=2.0, kernel_size=11)])
def test_knobs_match_timm(kwargs):
    ours, ref = _pair("mambaout_femto", **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    block = ours.stages[0].blocks[0]
    assert block.conv.kernel_size == (kwargs["kernel_size"],) * 2
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_ls_init_value_takes_effect():
    model = mambaout.create_model("mambaout_test", ls_init_value=0.25)
    gammas = [b.ls.gamma for s in model.stages for b in s.blocks]
    assert all(torch.equal(g, torch.full_like(g, 0.25)) for g in gammas)
    rw = mambaout.create_model("mambaout_small_rw", ls_init_value=1e-3)
    assert torch.allclose(rw.stages[0].blocks[0].ls.gamma, torch.tensor(1e-3))


def test_head_dropout_reaches_model():
    model = mambaout.create_model("mambaout_test", drop_rate=0.5)
    assert model.head.drop.p == 0.5
    x = torch.randn(2, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_drop_path_rates_rise_linearly():
    model = mambaout.create_model("mambaout_femto", drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates) and len(rates) == 18


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'mambaout_huge'"):
        mambaout.create_model("mambaout_huge")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        mambaout.create_model("mambaout_test", kernel_size=4)
    with pytest.raises(ValueError, match="conv_ratio"):
        mambaout.create_model("mambaout_test", conv_ratio=3.0)
    with pytest.raises(ValueError, match="act_layer"):
        mambaout.create_model("mambaout_test", act_layer="swish2")


def test_list_models():
    assert mambaout.list_models("*_rw") == RW
    assert set(PAPER + RW) <= set(mambaout.list_models(pretrained=True))
    assert "mambaout_base_plus_rw.sw_e150_in12k" in mambaout.list_pretrained()


def test_pretrained_cfg_carries_eval_transform():
    with torch.device("meta"):  # the metadata only: no need to initialise 86M weights
        model = mambaout.create_model("mambaout_base_tall_rw.sw_e500_in1k")
    assert model.pretrained_cfg["crop_pct"] == 0.95 and model.pretrained_cfg["interpolation"] == "bicubic"
    w = get_variant("mambaout_tiny")[0].default_weights
    assert w.top1 == 82.7 and w.urls[0].startswith("https://github.com/yuweihao/MambaOut/releases/download/model/")
