"""The training recipe that `fit` and the database's labels share.

NAS-Bench-201's recipe: SGD with Nesterov momentum 0.9 and weight decay 5e-4, learning
rate 0.1 annealed to zero on a cosine over the images seen; the augmentation is a policy
(``augment``). Images stay uint8 on the device and are augmented there; tensors are
channels-last; the forward pass runs in bfloat16 where the device computes it natively.

Randomness is a function of (seed, epoch, position in the epoch), never of a generator's
running state, so a run stopped anywhere resumes exactly, and two runs that train
different cells on the same task see the same batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augment import Policy

MAX_DEFAULT_BATCH = 256
MIN_DEFAULT_BATCH = 16

# Channels-last everywhere: cuDNN picks its tensor-core kernels for it on a GPU, and on the
# 2-core development CPU a training step of the default network ran 1.29x faster (oneDNN).
CHANNELS_LAST = torch.channels_last


def default_batch_size(num_train: int) -> int:
    """NAS-Bench-201's 256, made smaller on small sets so an epoch has about fifty steps.

    With 2,400 training images (fashion_mnist, 15 epochs, the ResNet cell) batch 48 reached
    85.7% validation accuracy against 80.3% at batch 240 (ten steps an epoch): docs/fit.md.
    """
    return max(MIN_DEFAULT_BATCH, min(MAX_DEFAULT_BATCH, num_train // 50))


def computes_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a GPU, or a CPU with AVX512-BF16 or
    AMX. Elsewhere oneDNN emulates bfloat16, slower than float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:  # private in torch 2.x, hence the guard
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def autocast(device: torch.device):
    """The forward pass in bfloat16 where the device computes it natively, else float32:
    on the 2-core development CPU (AMD EPYC, AVX512-BF16) a training step of the default
    network ran 1.5x faster. The weight-cast cache is off so that a captured CUDA graph
    and an eager step run the same kernels."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_bfloat16(device), cache_enabled=False)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [0, 1]: what a trained network takes."""
    return images.float().mul_(1.0 / 255.0)


def cosine_lr(base: float, progress: float) -> float:
    """progress: the fraction of all training images seen, 0..1."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"metad2a-fit/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass(frozen=True)
class EpochPlan:
    """An epoch's randomness, drawn up front: the image order and the augmentation policy's
    per-image parameters."""

    order: torch.Tensor  # (N,) int64
    params: tuple[torch.Tensor, ...]  # each (N, ...)

    @classmethod
    def draw(cls, seed: int, epoch: int, n: int, policy: Policy, device: torch.device | str = "cpu") -> EpochPlan:
        # Drawn on the CPU (the same on every device), then copied once: a copy from pageable
        # host memory every step would wait for the GPU and leave it idle between steps.
        g = _epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=g)
        params = policy.draw(g, n)
        return cls(order.to(device), tuple(p.to(device) for p in params))

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """(order, *params) of the images at positions start..stop of the epoch."""
        return (self.order[start:stop], *(p[start:stop] for p in self.params))


def members_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the networks of each one's mean cross-entropy, so each gets the gradient it
    would get alone. logits: (B, classes) for one network or (K, B, classes) for K."""
    logits = logits.reshape(-1, *logits.shape[-2:]).float()  # (K, B, classes)
    k = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(k)) * k


class NesterovSGD:
    """SGD with Nesterov momentum and weight decay, as ``torch.optim.SGD`` computes it, but
    with the learning rate in a device tensor: a step then never reads a value back to the
    host, so it can be captured in a CUDA graph and replayed with a new rate."""

    def __init__(self, params: Sequence[nn.Parameter], momentum: float, weight_decay: float):
        self.params = list(params)
        self.momentum, self.weight_decay = momentum, weight_decay
        self.buffers = [torch.zeros_like(p) for p in self.params]
        self.lr = torch.zeros((), device=self.params[0].device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        # A parameter without a gradient (a stem whose cell passes nothing on) is left alone,
        # as torch.optim.SGD leaves it.
        live = [(p, b) for p, b in zip(self.params, self.buffers) if p.grad is not None]
        params, buffers = [p for p, _ in live], [b for _, b in live]
        grads = [p.grad for p in params]
        torch._foreach_add_(grads, params, alpha=self.weight_decay)  # d = g + wd p
        torch._foreach_mul_(buffers, self.momentum)
        torch._foreach_add_(buffers, grads)  # b = mu b + d
        torch._foreach_add_(grads, buffers, alpha=self.momentum)  # d = d + mu b (Nesterov)
        torch._foreach_mul_(grads, self.lr)
        torch._foreach_sub_(params, grads)
