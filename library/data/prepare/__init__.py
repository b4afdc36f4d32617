"""Preparation of the paper's data sets (Pokemon, CelebA subsets, AFHQ / MS-COCO Large 5X) from local copies.

Each ``prepare_*`` function writes a flat captioned image folder (``x.png`` + ``x.txt``, square centre
crops) and a split manifest with the Table 4 sizes; ``scripts/prepare_<dataset>.py`` are thin CLIs over the
modules' ``main``. Nothing is downloaded.
"""

from __future__ import annotations

from library.data.prepare.common import CaptionTable, PreparedDataset, read_captions

__all__ = ["CaptionTable", "PreparedDataset", "read_captions"]
