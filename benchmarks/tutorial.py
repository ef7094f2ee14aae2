"""The benchmark's reference (a): the tutorial's conditional GAN and training loop, as written.

Its one fix: the G step calls backward(), without which G never learns. Everything else (Sigmoid +
BCELoss, fakes not detached in the D step, per-sample PIL transforms, .item() every step) is kept on
purpose. ``benchmarks/bench.py`` drives these pieces as its case (a).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torchvision.datasets import MNIST, VisionDataset

from gan_dist.config import DatasetInfo


def tutorial_misfit(info: DatasetInfo) -> str | None:
    """Why the tutorial's loop cannot run on this data, or None when it can: its networks are fixed to
    28×28 grayscale images of 10 classes."""
    if info.shape == (1, 28, 28) and info.num_classes == 10:
        return None
    return (f"the tutorial's networks need 28×28 grayscale images of 10 classes; {info.name} is "
            f"{'×'.join(map(str, info.shape))} with {info.num_classes} classes")


def _tutorial_mlp(widths: Sequence[int], dropout: float | None) -> list[nn.Module]:
    """Linear + LeakyReLU(0.2, inplace) (+ Dropout) between consecutive widths."""
    layers: list[nn.Module] = []
    for w_in, w_out in itertools.pairwise(widths):
        layers += [nn.Linear(w_in, w_out), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Dropout(dropout)] if dropout is not None else []
    return layers


class TutorialGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(10, 10)
        self.model = nn.Sequential(*_tutorial_mlp((110, 256, 512, 1024), None),
                                   nn.Linear(1024, 784), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = z.view(z.size(0), 100)
        c = self.label_emb(labels)
        x = torch.cat([z, c], 1)
        out = self.model(x)
        return out.view(x.size(0), 28, 28)


class TutorialDiscriminator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.label_emb = nn.Embedding(10, 10)
        self.model = nn.Sequential(*_tutorial_mlp((794, 1024, 512, 256), 0.3),
                                   nn.Linear(256, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), 784)
        c = self.label_emb(labels)
        x = torch.cat([x, c], 1)
        out = self.model(x)
        return out.squeeze()


class TutorialDataset(MNIST):
    """torchvision's MNIST dataset, its per-sample ``__getitem__`` (PIL image, then the transform)
    untouched, over the split gan_dist loaded: (a) trains on exactly the samples (b) and (c) see."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        VisionDataset.__init__(self, root=None, transform=transform)
        self.data = images.squeeze(1)  # the raw bytes [N, 28, 28], as torchvision's MNIST holds them
        self.targets = labels


def tutorial_generator_train_step(batch_size: int, discriminator: nn.Module, generator: nn.Module,
                                  g_optimizer: torch.optim.Optimizer, criterion: nn.Module,
                                  device: torch.device) -> float:
    g_optimizer.zero_grad()
    z = torch.randn(batch_size, 100).to(device)
    fake_labels = torch.LongTensor(np.random.randint(0, 10, batch_size)).to(device)
    fake_images = generator(z, fake_labels)
    validity = discriminator(fake_images, fake_labels)
    g_loss = criterion(validity, torch.ones(batch_size).to(device))
    g_loss.backward()  # the fix: missing in the tutorial
    g_optimizer.step()
    return g_loss.item()


def tutorial_discriminator_train_step(batch_size: int, discriminator: nn.Module, generator: nn.Module,
                                      d_optimizer: torch.optim.Optimizer, criterion: nn.Module,
                                      real_images: torch.Tensor, labels: torch.Tensor,
                                      device: torch.device) -> float:
    d_optimizer.zero_grad()
    real_validity = discriminator(real_images, labels)
    real_loss = criterion(real_validity, torch.ones(batch_size).to(device))
    z = torch.randn(batch_size, 100).to(device)
    fake_labels = torch.LongTensor(np.random.randint(0, 10, batch_size)).to(device)
    fake_images = generator(z, fake_labels)
    fake_validity = discriminator(fake_images, fake_labels)
    fake_loss = criterion(fake_validity, torch.zeros(batch_size).to(device))
    d_loss = real_loss + fake_loss
    d_loss.backward()
    d_optimizer.step()
    return d_loss.item()
