"""The data layer: any image source, converted once into a uint8 cache that every rank memory-maps, its
description (``DatasetInfo``), and per-rank batches."""
