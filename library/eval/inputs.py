"""What an evaluation attacks, read and checked before any model is loaded: the samples of the split manifest
and the evaluated models (the base model, one spec per LoRA file and one per fully fine-tuned UNet)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from library.data.lineage import UNRECORDED, parent_splits
from library.errors import DataError, ModelError, warn
from library.eval.conditioning import CONDITIONING_KEYS
from library.eval.config import EvalConfig
from library.eval.features import Sample
from library.eval.records import BASE_NAME, EVAL_SPLITS, EvalSamples, ModelSpec
from library.eval.unet_weights import resolve_unet_weights, weights_metadata
from library.sd.single_file import META_CONFIGS, META_FORMAT, META_TOKENIZER


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text) or "lora"


def model_specs(config: EvalConfig, split: SplitIdentity) -> list[ModelSpec]:
    """The base model, one spec per LoRA (files exist and belong to this split), then one per fully fine-tuned
    UNet (files found, format checked and hashed); names unique."""
    from networks.lora import lora_file_sha256, read_lora_metadata
    from networks.lora_convert import ADAPTER_METADATA_KEY

    specs = [ModelSpec(BASE_NAME)]
    used = {BASE_NAME}
    for file in config.network_weights:
        path = Path(file)
        sha = lora_file_sha256(path)  # ModelError for a missing file; the tensors only (sd-scripts' model hash)
        header = read_lora_metadata(path)  # not safetensors: ModelError
        if header.get(ADAPTER_METADATA_KEY):  # diffusers' alphas live in the header: part of what is evaluated
            sha = hashlib.sha256(f"{sha}\x1f{header[ADAPTER_METADATA_KEY]}".encode("utf-8")).hexdigest()
        meta = _recorded(config, split, f"LoRA {path}", header)
        specs.append(ModelSpec(_unique_name(path.stem, used), path, sha, meta))
    for entry in config.unet_weights:
        weights = resolve_unet_weights(entry, allow_pickle=config.allow_pickle)  # one ModelError line if unusable
        path = weights.path.resolve()
        # A folder named unet/ is the UNet of a pipeline folder: the pipeline's name says more.
        stem = path.stem if not path.is_dir() else path.parent.name if path.name == "unet" else path.name
        meta = _recorded(config, split, f"fine-tuned UNet {weights.path}", weights_metadata(weights))
        specs.append(ModelSpec(_unique_name(stem, used), metadata=meta, unet=weights))
    return specs


# A single-file checkpoint's description of its own networks (configs, tokenizer): not training metadata.
_MODEL_DESCRIPTION_KEYS = {META_CONFIGS, META_TOKENIZER, META_FORMAT}


def _recorded(config: EvalConfig, split: SplitIdentity, what: str, meta: dict[str, str]) -> dict[str, str]:
    """What the report shows of a model's training metadata, and the conditioning library.eval.conditioning reads;
    a model trained on another split is one DataError line (its membership labels would be wrong). Compared by
    the splits' content (``smp_lora.split_sha256``: a moved dataset's re-written manifest still matches), or for
    older files by the manifest file's bytes."""
    key = "split_sha256" if meta.get("smp_lora.split_sha256") else "manifest_sha256"
    recorded, current = meta.get(f"smp_lora.{key}"), getattr(split, key)
    if not config.allow_manifest_mismatch:
        if recorded and recorded != current:
            raise DataError(
                f"{what} was trained with another split manifest ({key} {recorded[:12]}...) than "
                f"{config.split_manifest} ({current[:12]}...): its membership labels would be wrong; "
                "pass the manifest it was trained with (or --allow_manifest_mismatch)"
            )
        if meta.get("smp_lora.method") and not recorded:
            raise DataError(
                f"{what} was trained on a whole folder (--train_data_dir), not on a split manifest: nothing records "
                f"which images it saw, so {config.split_manifest}'s non-members may be members; train it with "
                "--split_manifest (or pass --allow_manifest_mismatch if that folder held this manifest's members only)"
            )
        if not recorded and not meta.get("smp_lora.method"):
            warn(f"{what} records no split (not trained by smp-lora, or its metadata was stripped): nothing checks "
                 f"that it never saw {config.split_manifest}'s non-members, and its membership numbers assume so")
        _check_ancestors(config, split, what, meta)
    return {k: v for k, v in meta.items() if k not in _MODEL_DESCRIPTION_KEYS
            and (k.startswith(("smp_lora.", "ss_network", "ss_base")) or k in CONDITIONING_KEYS)}


def check_lora_layouts(specs: Sequence[ModelSpec]) -> None:
    """Every LoRA file's tensors have a LoRA layout (kohya, diffusers or PEFT keys, in down/up pairs) and finite
    values: one ModelError line before the base model loads, in ``--dry_run`` too. Whether its layers are this
    model's is checked once the base model is loaded. The file is read here only: the spec keeps what was read
    (:attr:`ModelSpec.lora_read`), which the later stages apply."""
    from networks.lora_convert import group_lora_state_dict
    from networks.lora_io import read_lora_source

    for spec in specs:
        if spec.lora_path is not None:
            spec.lora_read = read_lora_source(spec.lora_path)
            group_lora_state_dict(*spec.lora_read)


def _check_ancestors(config: EvalConfig, split: SplitIdentity, what: str, meta: dict[str, str]) -> None:
    """A LoRA that continued another (``--network_weights``) carries the splits its ancestors trained on
    (:mod:`library.data.lineage`): another split is one DataError line, an unrecorded one a warning."""
    ancestors = parent_splits(meta)
    other = sorted({s for s in ancestors if s not in (split.split_sha256, UNRECORDED)})
    if other:
        raise DataError(
            f"{what} continues a LoRA trained on another split ({other[0][:12]}...) than {config.split_manifest} "
            f"({split.split_sha256[:12]}...): its weights may have seen this split's non-members; evaluate a LoRA "
            "trained from scratch, or from a LoRA of this split only (or pass --allow_manifest_mismatch)")
    if UNRECORDED in ancestors:
        warn(f"{what} continues a LoRA that records no split (from elsewhere, or trained on a whole folder): its "
             f"membership numbers assume that LoRA never saw {config.split_manifest}'s images")


def check_base_model(config: EvalConfig, specs: Sequence[ModelSpec], base_fingerprint: str) -> None:
    """A model trained on another base than the one given is one ModelError line: its LoRA would be measured on
    weights it never adapted (shapes alike, numbers meaningless). ``base_fingerprint`` is of the base's fp32 weights
    (:func:`library.eval.models.load_bundle`), as training records it; files that record none are not checked."""
    if config.allow_base_mismatch:
        return
    for spec in specs:
        recorded = spec.metadata.get("smp_lora.base_fingerprint")
        if recorded and recorded != base_fingerprint:
            raise ModelError(
                f"{spec.lora_path or spec.unet.path} was trained on another base model (fingerprint {recorded[:12]}...) "
                f"than {config.pretrained_model_name_or_path} ({base_fingerprint[:12]}...); pass the base it was "
                "trained on (or --allow_base_mismatch)")


def _unique_name(stem: str, used: set[str]) -> str:
    """``stem`` made safe for file names and distinct from every name in ``used`` (which it joins)."""
    name = _safe_name(stem)
    candidate, n = name, 2
    while candidate in used:
        candidate, n = f"{name}-{n}", n + 1
    used.add(candidate)
    return candidate


@dataclass(frozen=True)
class SplitIdentity:
    """The evaluated split manifest's two hashes: its file's bytes, and its splits' content."""

    manifest_sha256: str
    split_sha256: str


def load_samples(config: EvalConfig) -> tuple[Any, EvalSamples, SplitIdentity]:
    """Read and verify the manifest; refuse empty splits. Returns (manifest, samples, its identity)."""
    from library.data.manifest import manifest_sha256, read_manifest, split_sha256

    path = config.split_manifest
    assert path is not None
    manifest = read_manifest(path, verify=True)  # DataError when an image changed or is missing
    for name in EVAL_SPLITS:
        if not getattr(manifest, name):
            raise DataError(
                f"split manifest {path}: split '{name}' is empty; membership evaluation needs members and "
                "non-members in both D_aux and D_te — re-create the manifest with all four sizes > 0"
            )
    samples, rel, splits, labels = [], [], [], []
    for name in EVAL_SPLITS:
        for entry in getattr(manifest, name):
            samples.append(Sample(manifest.abs_path(entry), entry.caption, entry.sha256))
            rel.append(entry.path)
            splits.append(name)
            labels.append(1 if name.startswith("member") else 0)
    identity = SplitIdentity(manifest_sha256(path), split_sha256(manifest))
    return manifest, EvalSamples(samples, rel, splits, np.asarray(labels, dtype=np.int64)), identity


__all__ = ["SplitIdentity", "check_lora_layouts", "load_samples", "model_specs"]
