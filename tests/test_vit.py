"""DeiT ViT-Ti/S with a causal switch (paper Fig. 3b): causal attention really hides the future, full does not."""

import pytest
import torch

import mambaout
from mambaout.analysis.flops import count_params
from mambaout.models.vit import Attention, VisionTransformer


def _small_vit(causal: bool) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=48, patch_size=16, embed_dim=32, depth=3, num_heads=2, causal=causal).eval()


@pytest.mark.parametrize("t", [0, 4, 8])
def test_causal_token_does_not_see_later_tokens(t):
    """On a token sequence (patch and class embedding bypassed): outputs up to t ignore every token after t."""
    model = _small_vit(causal=True)
    x = torch.randn(2, 10, 32)  # [B, L, D]: 9 patch tokens + the class token
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    with torch.no_grad():
        y, y2 = model.forward_tokens(x), model.forward_tokens(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-6)
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().amax() > 1e-2


@pytest.mark.parametrize("t", [0, 4, 8])
def test_full_attention_token_sees_later_tokens(t):
    model = _small_vit(causal=False)
    x = torch.randn(2, 10, 32)
    x2 = x.clone()
    x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
    with torch.no_grad():
        y, y2 = model.forward_tokens(x), model.forward_tokens(x2)
    assert ((y2[:, : t + 1] - y[:, : t + 1]).abs().amax(dim=-1) > 1e-3).all()  # every earlier token changes


def test_causal_on_images_last_patch_only_reaches_class_token():
    """Through the real embedding: changing the bottom-right patch leaves all other patch tokens unchanged, but
    the class token (last, so it sees every patch) and the logits do change."""
    model = _small_vit(causal=True)
    img = torch.randn(1, 3, 48, 48)
    img2 = img.clone()
    img2[..., 32:, 32:] += 1.0  # the last patch in row-major order
    with torch.no_grad():
        f, f2 = model.forward_features(img), model.forward_features(img2)
        logits, logits2 = model(img), model(img2)
    torch.testing.assert_close(f2[:, :8], f[:, :8], rtol=0, atol=1e-6)
    assert (f2[:, 8:] - f[:, 8:]).abs().amax() > 1e-3 and (logits2 - logits).abs().amax() > 1e-4


def test_causal_equals_explicit_mask():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, causal=True)
    x = torch.randn(1, 6, 16)
    q, k, v = attn.qkv(x).view(1, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 16))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name,dim,heads,params_m",
    [("vit_tiny_deit", 192, 3, 5.72), ("vit_small_deit_causal", 384, 6, 22.05)],
)
def test_registered_deit_configurations(name, dim, heads, params_m):
    with torch.device("meta"):
        model = mambaout.create_model(name)
    assert round(count_params(model) / 1e6, 2) == params_m  # DeiT-Ti 5.7M, DeiT-S 22.1M
    assert len(model.blocks) == 12 and model.patch_size == 16 and model.num_features == dim
    assert all(b.attn.num_heads == heads and b.attn.causal == name.endswith("_causal") for b in model.blocks)
    assert model.pos_embed.shape == (1, 14 * 14 + 1, dim)


def test_trains_at_other_resolutions_and_has_model_api():
    model = mambaout.create_model("vit_tiny_deit_causal", num_classes=10)
    assert model.model_name == "vit_tiny_deit_causal"
    x = torch.randn(2, 3, 64, 64)  # 4x4 patches: the 14x14 position embedding is interpolated
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    groups = model.param_groups(0.05)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {"cls_token", "pos_embed"} <= model.no_weight_decay()
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 60, 60))
