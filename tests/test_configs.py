"""Every shipped recipe loads, and builds networks that take and give images of its data's shape."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from shapes import batch, info

from gan_dist.configio import load_config
from gan_dist.models.base import build_models, label_count

RECIPES = {  # the shape each recipe's data has
    "mnist_cgan.yaml": info(1, 28, 10),
    "mnist_dcgan.yaml": info(1, 28, 10),
    "cifar10_dcgan.yaml": info(3, 32, 10),
    "folder64_dcgan.yaml": info(3, 64, 10),
    "folder_small.yaml": info(3, 32, 9),
    "folder_large.yaml": info(3, 32, 10),
    "cifar10_resnet.yaml": info(3, 32, 10),
    "cifar10_r3gan.yaml": info(3, 32, 10),
}


def test_every_recipe_is_listed():
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_builds_networks_for_its_data(name):
    cfg = load_config(REPO / "configs" / name, [])
    described = RECIPES[name]
    generator, discriminator = build_models(cfg.model, described)
    images, labels = batch(4, described)
    z = torch.randn(4, cfg.model.z_dim)
    assert label_count(cfg.model, described) == described.num_classes
    with torch.no_grad():
        assert generator(z, labels).shape == images.shape
        assert discriminator(images, labels).shape == (4,)
