"""Augmentation policies (``--augment``): per-image randomness drawn up front, applied in batches.

A policy draws the random parameters of every image of an epoch at once, on the CPU, from
the epoch's generator: they are a function of (seed, epoch, position in the epoch) like the
image order, so a resumed run sees what it would have seen. It then applies them to a batch
of uint8 images on the device with shapes that never depend on the data and no value read
back to the host, so the whole training step, augmentation included, can be captured in a
CUDA graph. The policies' names and descriptions are ``schedule.AUGMENT_POLICIES``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .policies import AUGMENT_POLICIES, check_policy


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Per-image random crop of the zero-padded image, then an optional mirror, in one gather.

    images: (B, C, S, S) any dtype; offsets: (B, 2) row/column start in the padded image;
    flips: (B,) bool, or None for no mirror.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w, device=dev)  # (B, W)
    if flips is not None:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class Policy:
    """No augmentation. A policy's ``draw`` gives per-image tensors (first dimension N) that
    the trainer slices per batch and passes, in order, to ``apply``."""

    def __init__(self, size: int):
        self.size = size
        self.pad = max(1, size // 8)

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        return ()

    def apply(self, images: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """images: uint8 (B, 3, S, S) -> uint8 (B, 3, S, S)."""
        return images


class Crop(Policy):
    def draw(self, generator, n):
        return (torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator),)

    def apply(self, images, offsets):
        return crop_and_flip(images, offsets, None, self.pad)


class CropFlip(Policy):
    def draw(self, generator, n):
        # The same draws, in the same order, as fit made before policies had names: a run
        # started then resumes on the same crops and flips.
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        return offsets, torch.rand(n, generator=generator) < 0.5

    def apply(self, images, offsets, flips):
        return crop_and_flip(images, offsets, flips, self.pad)


# TrivialAugmentWide's ops, in torchvision's order, grouped by how they are computed here.
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")  # x * f + degenerate * (1 - f)
OPS = ("Identity", *GEOMETRIC, *BLENDS, "Posterize", "Solarize", "AutoContrast", "Equalize")
NUM_BINS = 31  # torchvision's default number of magnitudes


def _magnitude_table(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ops, bins) float64 magnitudes and (ops,) bool 'signed', from torchvision's own table."""
    from torchvision.transforms.v2 import TrivialAugmentWide

    space = TrivialAugmentWide._AUGMENTATION_SPACE
    if tuple(space) != OPS:
        raise RuntimeError(f"torchvision's TrivialAugmentWide has other ops than this metad2a knows: {list(space)}")
    table = torch.zeros(len(OPS), NUM_BINS, dtype=torch.float64)
    signed = torch.zeros(len(OPS), dtype=torch.bool)
    for i, (magnitudes, is_signed) in enumerate(space.values()):
        values = magnitudes(NUM_BINS, size, size)
        if values is not None:
            table[i] = values.double()
        signed[i] = is_signed
    return table, signed


class TrivialAugment(Crop):
    """The crop, then TrivialAugmentWide (Müller & Hutter, 2021): one op per image, drawn
    uniformly from torchvision's fourteen, at one of its 31 magnitudes, with a random sign.

    torchvision's transform draws one op per call: on a batch, every image would get the
    same op, and called image by image it is a Python loop that no CUDA graph can hold. So
    the ops and magnitudes are drawn per image up front and applied to the batch at once:
    each op is computed for every image and the drawn one is kept. An image then comes out
    as torchvision's ``v2.functional`` op at that magnitude makes it (tested op by op);
    equalize is torchvision's own kernel, already per image.
    """

    def __init__(self, size: int):
        super().__init__(size)
        self.table, self.signed = _magnitude_table(size)

    def draw(self, generator, n):
        (offsets,) = super().draw(generator, n)
        op = torch.randint(0, len(OPS), (n,), generator=generator)
        magnitude = self.table[op, torch.randint(0, NUM_BINS, (n,), generator=generator)]
        flip_sign = self.signed[op] & (torch.rand(n, generator=generator) < 0.5)
        return offsets, *self.parameters(op, torch.where(flip_sign, -magnitude, magnitude))

    def parameters(self, op: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-image op ids and signed magnitudes (float64) -> what ``apply_ops`` takes."""
        s, m = self.size, magnitude

        def where(name: str, value, other=0.0) -> torch.Tensor:
            return torch.where(op == OPS.index(name), value, other)

        # Inverse affine maps, output pixel -> input pixel, in pixel units about the image
        # centre, as torchvision's affine and rotate build them (shears about the top-left
        # corner, translations truncated to whole pixels, rotation about the centre).
        angle = where("Rotate", torch.deg2rad(-m))
        cos, sin, shift = angle.cos(), angle.sin(), m.trunc()
        theta = torch.stack([
            torch.stack([cos, where("ShearX", m, sin), where("ShearX", m * s / 2, where("TranslateX", -shift))], -1),
            torch.stack([where("ShearY", m, -sin), cos, where("ShearY", m * s / 2, where("TranslateY", -shift))], -1),
        ], 1)  # (N, 2, 3)
        bits = torch.where(op == OPS.index("Posterize"), m, 8.0).long().clamp(0, 8)
        keep_bits = ((1 << bits) - 1) << (8 - bits)  # posterize's mask
        return (
            op,
            theta.float(),
            (1.0 + m).float(),  # the blends' factor f; their 1 - f is -m, exact in float32
            m.float(),
            keep_bits.to(torch.uint8),
            (255.0 * m).float(),  # solarize's threshold
        )

    def apply(self, images, offsets, *ops):
        return self.apply_ops(super().apply(images, offsets), *ops)

    def apply_ops(self, x, op, theta, factor, magnitude, keep_bits, threshold):
        from torchvision.transforms.v2.functional import equalize

        b = len(x)
        per_image = (b, 1, 1, 1)
        op = op.view(per_image)
        xf = x.float()

        # Geometric: one nearest-neighbour resampling with each image's map; zeros outside.
        h, w = x.shape[-2:]
        ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)
        xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
        base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=x.device)], -1)
        # Scaled to grid_sample's [-1, 1] by scalars: a tensor made from a list here would be a
        # host-to-device copy, which a CUDA graph cannot capture.
        rescaled = theta.transpose(1, 2).clone()
        rescaled[..., 0] /= 0.5 * w
        rescaled[..., 1] /= 0.5 * h
        grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
        warped = F.grid_sample(xf, grid, mode="nearest", padding_mode="zeros", align_corners=False).round_()

        # Blends with a degenerate image: black, grey, the mean grey, or a 3x3 blur inside a
        # 1-pixel border that stays as it is.
        r, g, bl = xf.unbind(1)
        grey = r.mul(0.2989).add_(g, alpha=0.587).add_(bl, alpha=0.114).floor_().unsqueeze(1)
        kernel = torch.full((3, 1, 3, 3), 1.0 / 13.0, device=x.device)
        kernel[:, :, 1, 1] = 5.0 / 13.0
        blurred = xf.clone()
        blurred[..., 1:-1, 1:-1] = F.conv2d(xf, kernel, groups=3).round_()
        blend_op = op - OPS.index("Brightness")
        degenerate = torch.where(blend_op == 1, grey, torch.zeros_like(grey))
        degenerate = torch.where(blend_op == 2, grey.mean((1, 2, 3), keepdim=True), degenerate)
        f, one_minus_f = factor.view(per_image), -magnitude.view(per_image)
        blended = torch.where(
            blend_op == 3,
            xf + one_minus_f * (blurred - xf),  # sharpness: the border stays exact
            xf * f + degenerate * one_minus_f,
        )

        # Autocontrast: each channel stretched to 0..255 (a flat channel left as it is).
        lo, hi = xf.amin((2, 3), keepdim=True), xf.amax((2, 3), keepdim=True)
        flat = hi == lo
        stretched = (xf - torch.where(flat, 0.0, lo)) / torch.where(flat, 1.0, (hi - lo) * (1.0 / 255.0))

        out = torch.where((op >= OPS.index(GEOMETRIC[0])) & (op <= OPS.index(GEOMETRIC[-1])), warped, xf)
        out = torch.where((blend_op >= 0) & (blend_op < len(BLENDS)), blended, out)
        out = torch.where(op == OPS.index("AutoContrast"), stretched, out)
        out = out.clamp_(0, 255).to(torch.uint8)  # truncates, as torchvision's blends do
        out = torch.where(op == OPS.index("Posterize"), x & keep_bits.view(per_image), out)
        out = torch.where((op == OPS.index("Solarize")) & (xf >= threshold.view(per_image)), 255 - x, out)
        return torch.where(op == OPS.index("Equalize"), equalize(x), out)


_POLICIES = {"none": Policy, "crop": Crop, "crop-flip": CropFlip, "trivialaugment": TrivialAugment}
assert set(_POLICIES) == set(AUGMENT_POLICIES)


def make_policy(name: str, size: int) -> Policy:
    """The policy ``name`` for square images of side ``size``."""
    check_policy(name)
    return _POLICIES[name](size)
