"""One ``.safetensors`` file in the original LDM key layout: reading it as a :class:`ModelBundle`, writing one.

:func:`load_single_file` reads a checkpoint such as ``v1-5-pruned.safetensors`` (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``). LDM -> diffusers renaming uses diffusers'
own converters from ``diffusers.loaders.single_file_utils``; the configs come from the file's metadata
(``smp_lora.sd_configs``, written by :func:`save_single_file`) or, for files from elsewhere, from the SD v1.5
configs of :mod:`library.sd.configs`, so nothing is fetched from the Hub. Every tensor is shape-checked against
the config before any weight is materialised, so a wrong file gives one :class:`~library.errors.ModelError`
rather than a traceback from deep inside ``load_state_dict``.

:func:`save_single_file` writes the reverse: one LDM-layout ``.safetensors`` holding the three networks (names
from :mod:`library.sd.ldm_keys`), with the configs and the tokenizer in its metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError
from library.fileio import write_safetensors
from library.sd.bundle import (
    ModelBundle,
    assemble_bundle,
    first_line,
    load_tokenizer_folder,
)
from library.sd.configs import (
    SD15_TEXT_ENCODER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    diffusers_config,
    text_encoder_config,
)
from library.sd.ldm_keys import (
    LDM_TEXT_PREFIX,
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    to_ldm_state_dict,
)
from library.sd.text import (
    clip_tokenizer_from_bpe_file,
    tokenizer_from_dict,
    tokenizer_to_dict,
)

# Safetensors metadata keys written by save_single_file (values are JSON strings).
META_CONFIGS = "smp_lora.sd_configs"
META_TOKENIZER = "smp_lora.tokenizer"
META_FORMAT = "smp_lora.format"


def save_single_file(bundle: ModelBundle, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` as ONE LDM-layout ``.safetensors`` (configs and tokenizer in its metadata), atomically.

    ``dtype`` optionally casts the floating-point weights (e.g. ``torch.float16`` halves the file).
    """

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(f"{path}: a single-file checkpoint must end in .safetensors")
    tensors = {}
    for key, tensor in to_ldm_state_dict(bundle).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    configs = {
        "unet": diffusers_config(bundle.unet),
        "vae": diffusers_config(bundle.vae),
        "text_encoder": text_encoder_config(bundle.text_encoder),
    }
    metadata = {
        META_FORMAT: "1",
        META_CONFIGS: json.dumps(configs, sort_keys=True),
        META_TOKENIZER: json.dumps(tokenizer_to_dict(bundle.tokenizer)),
        "modelspec.architecture": "stable-diffusion-v1",
        "ss_base_model_version": bundle.base_model_version,
    }
    write_safetensors(path, tensors, metadata)
    return path


# ------------------------------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle_cm = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError (bad header, truncated), OSError
        raise ModelError(
            f"{path} is not a readable .safetensors file ({first_line(exc)}); it may be truncated or corrupt: "
            "download or export it again"
        ) from exc
    with handle_cm as handle:
        yield handle


def _read_json_metadata(path: Path, metadata: Mapping[str, str], key: str) -> Any:
    try:
        return json.loads(metadata[key])
    except ValueError as exc:
        raise ModelError(f"{path}: metadata entry {key!r} is not valid JSON ({exc}); re-export the file") from exc


def _classify_single_file(path: Path, keys: list[str]) -> None:
    """Refuse files that are clearly not an SD v1.x checkpoint, with a message saying what they look like."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelError(f"{path} looks like an SDXL checkpoint; smp-lora supports SD v1.x only")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelError(f"{path} looks like an SD 2.x checkpoint (OpenCLIP text encoder); smp-lora supports SD v1.x")
    if any(k.startswith(("lora_unet_", "lora_te_", "unet.")) or ".lora_" in k for k in keys[:1000]):
        raise ModelError(
            f"{path} looks like a LoRA file, not a base model; pass the SD v1.x checkpoint it was made for"
        )
    missing = [p for p in (LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX) if not any(k.startswith(p) for k in keys)]
    if missing:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise ModelError(
            f"{path} does not look like an SD v1.x checkpoint (no '{missing[0]}*' tensors; it has e.g. {sample})"
        )


def _check_against(
    path: Path, component: str, expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], hint: str
) -> None:
    """Compare a converted state dict with the model's own (meta) state dict; one clear error if they differ."""
    for key, reference in expected.items():
        if key in got and tuple(got[key].shape) != tuple(reference.shape):
            raise ModelError(
                f"{path} does not look like an SD v1.x checkpoint ({component} {key} expects shape "
                f"{tuple(reference.shape)}, file has {tuple(got[key].shape)}){hint}"
            )
    missing = [key for key in expected if key not in got]
    unexpected = [key for key in got if key not in expected]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelError(
            f"{path} does not look like an SD v1.x checkpoint ({component}: {len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, e.g. {detail}){hint}"
        )


def _as_dtype(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def _meta_model(model_cls: Any, config: Mapping[str, Any]) -> Any:
    """A diffusers model with shapes but no storage: cheap even for SD v1.5's 860 M-parameter UNet."""
    with torch.device("meta"):
        return model_cls.from_config(dict(config))


def _single_file_tokenizer(path: Path, metadata: Mapping[str, str], tokenizer_path: Path | None) -> Any:
    if tokenizer_path is not None:
        return load_tokenizer_folder(tokenizer_path)
    if META_TOKENIZER in metadata:
        data = _read_json_metadata(path, metadata, META_TOKENIZER)
        try:
            return tokenizer_from_dict(data)
        except Exception as exc:
            raise ModelError(f"{path}: the tokenizer in its metadata is unusable ({first_line(exc)})") from exc
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (it needs torchvision)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bpe = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
            if bpe.is_file():
                return clip_tokenizer_from_bpe_file(bpe)
    raise ModelError(
        f"{path} carries no tokenizer: pass --tokenizer_path with a local CLIP tokenizer folder (e.g. the "
        "tokenizer/ folder of a diffusers SD v1.5 download), or `pip install --no-deps open_clip_torch`, "
        "which ships the CLIP BPE vocabulary"
    )


def load_single_file(path: Path, tokenizer_path: Path | None, dtype: torch.dtype) -> ModelBundle:
    """Read one LDM-layout SD v1.x ``.safetensors`` as a frozen :class:`ModelBundle` in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with _open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        _classify_single_file(path, keys)
        if META_CONFIGS in metadata:
            configs = _read_json_metadata(path, metadata, META_CONFIGS)
            hint = ""
        else:
            configs = {"unet": SD15_UNET_CONFIG, "vae": SD15_VAE_CONFIG, "text_encoder": SD15_TEXT_ENCODER_CONFIG}
            hint = "; files without smp-lora metadata are read with the SD v1.5 architecture"
        # Only the three networks' tensors are read: EMA copies and schedule buffers in the file are skipped.
        try:
            checkpoint = {
                key: handle.get_tensor(key)
                for key in keys
                if key.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX))
            }
        except Exception as exc:
            raise ModelError(
                f"{path} could not be read ({first_line(exc)}); it may be truncated or corrupt: download or "
                "export it again"
            ) from exc

    try:
        unet = _meta_model(UNet2DConditionModel, configs["unet"])
        vae = _meta_model(AutoencoderKL, configs["vae"])
        te_config = CLIPTextConfig(**configs["text_encoder"])
        with torch.device("meta"):
            te_meta = CLIPTextModel(te_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: the model configs in its metadata are unusable ({first_line(exc)})") from exc

    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
        te_sd = convert_ldm_clip_checkpoint(checkpoint)
    except Exception as exc:  # the converters index blocks by config; a different layout fails inside them
        raise ModelError(
            f"{path} does not look like an SD v1.x checkpoint (its tensors do not fit the SD v1.x layout: "
            f"{first_line(exc)}){hint}"
        ) from exc
    te_sd.pop("text_model.embeddings.position_ids", None)  # a buffer older exports saved; rebuilt by the model
    if not hasattr(te_meta, "text_model"):
        te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    del checkpoint

    _check_against(path, "unet", unet.state_dict(), unet_sd, hint)
    _check_against(path, "vae", vae.state_dict(), vae_sd, hint)
    _check_against(path, "text_encoder", te_meta.state_dict(), te_sd, hint)

    # UNet and VAE have no non-persistent buffers, so the meta modules can adopt the file's tensors directly
    # (no throw-away random init of 860 M parameters). CLIP keeps a position-id buffer outside its state dict,
    # so it is built for real (123 M parameters, about a second).
    unet.load_state_dict(_as_dtype(unet_sd, dtype), strict=True, assign=True)
    vae.load_state_dict(_as_dtype(vae_sd, dtype), strict=True, assign=True)
    text_encoder = CLIPTextModel(te_config)
    text_encoder.load_state_dict(te_sd, strict=True)
    for name, module in (("unet", unet), ("vae", vae)):
        leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if leftover:  # a diffusers change added buffers: fail loudly rather than compute with empty tensors
            raise RuntimeError(f"{name} tensors left unloaded: {leftover[:3]}")

    tokenizer = _single_file_tokenizer(path, metadata, tokenizer_path)
    return assemble_bundle(tokenizer, text_encoder, vae, unet, dtype, source=str(path))
