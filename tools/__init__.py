"""Helpers that make data for gan_dist from a checkout (not part of the installed package): the Twemoji folder
(``tools/twemoji.py``), colour Fashion-MNIST (``tools/colour_fashion.py``) and seeded subsets of a folder
(``tools/subset_folder.py``). Run them from the repository root, e.g. ``python tools/colour_fashion.py``.
"""
