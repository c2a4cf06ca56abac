"""Feature taps, model descriptions, layer maps and several teachers: the zoo's shared machinery."""
from __future__ import annotations

import pytest
import torch

from vitdistill.errors import UserError
from vitdistill.models import create_model
from vitdistill.models.taps import FeatureTaps, Tap, describe, resolve_layer_map, uniform_layer_map
from vitdistill.models.wrappers import Teacher, TeacherEnsemble, student_outputs


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("deit_pico_distilled_patch4_32", 10, 32)[0].eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_model("resnet_micro_cnn", 10, 32)[0].eval()


def test_block_taps_are_the_blocks_outputs(vit):
    x = torch.randn(2, 3, 32, 32)
    taps = FeatureTaps(vit, [Tap("block", 0), Tap("block", -1)])
    with taps.capture():
        vit(x)
    got = taps.pop()
    tokens = vit.pos_drop(vit._pos_embed(vit.patch_embed(x)))
    first = vit.blocks[0](tokens)
    torch.testing.assert_close(got["block.0"], first)
    assert got["block.-1"].shape == (2, 64 + 2, 96)  # 8x8 patches plus class and distillation tokens
    taps.remove()


def test_attention_taps_match_unfused_attention(vit):
    x = torch.randn(2, 3, 32, 32)
    taps = FeatureTaps(vit, [Tap("attn", 2), Tap("qkv", 2), Tap("block", 1)])
    with taps.capture():
        vit(x)
    got = taps.pop()
    attn = vit.blocks[2].attn
    h = vit.blocks[2].norm1(got["block.1"])
    b, n, c = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    expected = torch.softmax(q @ k.transpose(-2, -1) / (c // attn.num_heads) ** 0.5, dim=-1)
    torch.testing.assert_close(got["attn.2"], expected)
    assert got["attn.2"].shape == (2, 3, 66, 66)
    torch.testing.assert_close(got["qkv.2"], torch.stack((q, k, v)))
    taps.remove()


def test_taps_capture_nothing_outside_capture_and_carry_gradients(vit):
    taps = FeatureTaps(vit, [Tap("attn", 0)])
    vit(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError):
        taps.pop()
    out = student_outputs(vit, torch.randn(2, 3, 32, 32), taps)
    assert set(out) >= {"logits", "attn.0"}
    out["attn.0"].sum().backward()
    assert vit.blocks[0].attn.qkv.weight.grad is not None
    vit.zero_grad(set_to_none=True)
    taps.remove()


def test_cnn_layers_are_its_stages_and_have_no_attention(cnn):
    info = describe(cnn, "resnet_micro_cnn", (3, 32, 32), 10)
    assert info.kind == "cnn"
    assert [layer.path for layer in info.layers] == ["layer1", "layer2", "layer3", "layer4"]
    assert [layer.shape for layer in info.layers] == [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]
    assert info.layers[2].width == 64
    with pytest.raises(UserError, match="need a ViT"):
        FeatureTaps(cnn, [Tap("attn", 0)])


def test_describe_vit(vit):
    info = describe(vit, "deit_pico", (3, 32, 32), 10)
    assert (info.kind, info.depth, info.num_prefix_tokens) == ("vit", 6, 2)
    assert info.layers[0].shape == (66, 96) and info.layers[0].heads == 3 and info.layers[0].width == 96
    with pytest.raises(UserError, match="layer 6 does not exist"):
        info.layer(6)


def test_uniform_layer_map():
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_map(6, 6) == list(range(6))
    assert uniform_layer_map(6, 4) == [0, 0, 1, 2, 2, 3]
    assert uniform_layer_map(3, 4) == [0, 2, 3]
    # halves round up, not to even: round(1.5) - 1, round(4.5) - 1 give 1 and 4
    assert uniform_layer_map(4, 6) == [1, 2, 4, 5]
    assert uniform_layer_map(4, 10) == [2, 4, 7, 9]
    for s in range(1, 13):
        for t in range(1, 13):
            assert uniform_layer_map(s, t) == [max(0, int((i + 1) * t / s + 0.5) - 1) for i in range(s)]


def test_resolve_layer_map(vit, cnn):
    s = describe(vit, "s", (3, 32, 32))
    t = describe(cnn, "t", (3, 32, 32))
    assert resolve_layer_map(s, t, None, None) == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 2), (5, 3)]
    assert resolve_layer_map(s, t, [1, 5], None) == [(1, 0), (5, 3)]
    assert resolve_layer_map(s, t, [0, 3], [1, 2]) == [(0, 1), (3, 2)]
    with pytest.raises(UserError, match="same length"):
        resolve_layer_map(s, t, [0, 3], [1])
    with pytest.raises(UserError, match="layer 7 does not exist"):
        resolve_layer_map(s, t, [0], [7])


def test_teacher_taps_and_ensemble(vit, cnn):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    t1, t2 = Teacher(cnn), Teacher(vit)
    both = TeacherEnsemble([t1, t2])
    both.tap((Tap("block", -1),))
    out = both(x)
    assert out["block.-1"].shape == (2, 128, 4, 4) and out["t1.block.-1"].shape == (2, 66, 96)
    torch.testing.assert_close(out["logits"], out["t0.logits"])
    assert not out["t1.logits"].requires_grad
    t1.tap(())
    t2.tap(())


def test_channels_last_stages_and_a_class_token_outside_the_blocks_are_read_as_they_are() -> None:
    """timm's Swin gives NHWC stage outputs (taps hand methods NCHW); CaiT counts a class token
    that its ``blocks`` never carry (the prefix is measured); its talking-heads attention is refused."""
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=24,
                             depths=(1, 1), num_heads=(1, 2), num_classes=10)
    info = describe(swin, "swin", (3, 32, 32), 10)
    assert [(l.shape, l.width) for l in info.layers] == [((24, 8, 8), 24), ((48, 4, 4), 48)]
    taps = FeatureTaps(swin.eval(), [Tap("block", 1)])
    x = torch.randn(2, 3, 32, 32)
    with taps.capture():
        swin(x)
    got = taps.pop()["block.1"]
    assert torch.equal(got, swin.layers[1](swin.layers[0](swin.patch_embed(x))).permute(0, 3, 1, 2))
    cait = timm.create_model("cait_xxs24_224", img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                             depth_token_only=1, num_classes=10)
    assert cait.num_prefix_tokens == 1 and describe(cait, "cait", (3, 32, 32), 10).num_prefix_tokens == 0
    with pytest.raises(UserError, match="'attn' taps read timm's plain self-attention"):
        FeatureTaps(cait, [Tap("attn", 0)])
