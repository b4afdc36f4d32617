"""The attack-suite test world: a *pre-trained* tiny base (on embedded digits outside the membership sets) and
a LoRA deliberately over-fitted on the members over the whole timestep range, so that every attack of the suite
has something to find (built once per session by the ``attack_world`` fixture of tests/conftest.py).

Unlike tests/mia_world.py (random-init UNet, random pixels), the base model here generates digits, so the
generation-based attacks (black-box, reconstruction) and the reference-calibrated ones see a realistic base.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from mia_world import overfit_lora

from library.data.manifest import SplitManifest, write_manifest
from library.data.splits import make_split

SUITE_SIZES = {"member_aux": 16, "member_test": 24, "nonmember_aux": 16, "nonmember_test": 24}
PRETRAIN = {"vae_steps": 80, "unet_steps": 300, "batch_size": 16, "vae_batch_size": 16, "threads": 1}
OVERFIT = {"steps": 600, "lr": 5e-3, "max_t": 1000}


def serial_captions(manifest: SplitManifest, seed: int = 0) -> SplitManifest:
    """The same split with one caption per image: its class caption plus a serial number drawn at random (so the
    number says nothing of the image's split), as in Wu et al.'s MS-COCO setting and the paper's Pokemon BLIP
    captions, where a caption names one image. With the attack world's ten shared class captions, generating from
    a member's caption need not give back that member (docs/results.md, section 10)."""
    entries = manifest.members() + manifest.nonmembers()
    serials = random.Random(seed).sample(range(100, 1000), len(entries))
    caption = {e.path: f"{e.caption}, specimen {n}" for e, n in zip(entries, serials)}
    return dataclasses.replace(manifest, **{name: [dataclasses.replace(e, caption=caption.get(e.path, e.caption))
                                                   for e in rows] for name, rows in manifest.splits().items()})


def build_captioned_world(world: dict, root: Path, overfit: dict | None = None) -> dict:
    """The attack world's base model and images with :func:`serial_captions`, and a LoRA over-fitted on them with a
    text-encoder LoRA as well (kohya's default and the paper's Pokemon setting): without it the UNet LoRA alone did
    not learn which serial goes with which image (docs/results.md, section 10)."""
    manifest = serial_captions(world["manifest"])
    manifest_file = root / "split.json"
    write_manifest(manifest, manifest_file)
    lora = overfit_lora(world["bundle"], manifest, manifest_file, root, text_encoder=True, **(overfit or OVERFIT))
    return {**world, "root": root, "manifest": manifest, "manifest_file": manifest_file, "lora": lora}


def build_attack_world(root: Path, overfit: dict | None = None, pretrain_settings: dict | None = None) -> dict:
    """Everything under ``root``: images/, split.json, model/ (pre-trained), overfit.safetensors."""
    from library.demo.digits import write_digits_dataset
    from library.demo.pretrain import pretrain_base_model
    from library.sd.loading import load_sd_model

    records = write_digits_dataset(root / "images", resolution=32, limit=400)
    manifest = make_split(records, sizes=SUITE_SIZES, seed=0, dataset_root=root / "images")
    manifest_file = root / "split.json"
    write_manifest(manifest, manifest_file)
    in_sets = {manifest.abs_path(e) for e in manifest.members() + manifest.nonmembers()}
    pretrain_records = [r for r in records if Path(r.path) not in in_sets]
    pretrain_base_model(pretrain_records, root / "model", seed=0, log=lambda _: None, **(pretrain_settings or PRETRAIN))
    bundle = load_sd_model(str(root / "model"))
    lora = overfit_lora(bundle, manifest, manifest_file, root, **(overfit or OVERFIT))
    return {"root": root, "bundle": bundle, "manifest": manifest, "manifest_file": manifest_file, "lora": lora}
