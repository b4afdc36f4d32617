"""The attack-suite test world: a *pre-trained* tiny base (on embedded digits outside the membership sets) and
a LoRA deliberately over-fitted on the members over the whole timestep range, so that every attack of the suite
has something to find (built once per session by the ``attack_world`` fixture of tests/conftest.py).

Unlike tests/mia_world.py (random-init UNet, random pixels), the base model here generates digits, so the
generation-based attacks (black-box, reconstruction) and the reference-calibrated ones see a realistic base.
"""

from __future__ import annotations

from pathlib import Path

from mia_world import overfit_lora

from library.data.manifest import write_manifest
from library.data.splits import make_split

SUITE_SIZES = {"member_aux": 16, "member_test": 24, "nonmember_aux": 16, "nonmember_test": 24}
PRETRAIN = {"vae_steps": 80, "unet_steps": 300, "batch_size": 16, "vae_batch_size": 16, "threads": 1}
OVERFIT = {"steps": 600, "lr": 5e-3, "max_t": 1000}


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
