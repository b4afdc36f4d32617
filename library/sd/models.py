"""Load Stable Diffusion v1.x offline: a diffusers folder or one single-file checkpoint.

:func:`load_sd_model` accepts

* a local **diffusers folder** (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, as written by
  ``StableDiffusionPipeline.save_pretrained``), loaded with ``local_files_only=True``;
* a **single-file** ``.safetensors`` checkpoint in the original LDM key layout (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``) such as ``v1-5-pruned.safetensors``.
  LDM -> diffusers renaming uses diffusers' own converters from ``diffusers.loaders.single_file_utils``; the
  configs come from the file's metadata (``smp_lora.sd_configs``, written by :func:`save_single_file`) or, for
  files from elsewhere, from the SD v1.5 configs built into this module, so nothing is fetched from the Hub.
  Every tensor is shape-checked against the config before any weight is materialised, so a wrong file gives one
  :class:`~library.errors.ModelError` rather than a traceback from deep inside ``load_state_dict``.

Pickle-based ``.ckpt`` files are refused (unpickling can run code); convert them to safetensors first.

:func:`save_single_file` writes the reverse: one LDM-layout ``.safetensors`` holding the three networks, with the
configs and the tokenizer in its metadata. The diffusers -> LDM key mapping is this module's own; the tests check
that diffusers' forward converters map it back exactly.

The noise scheduler is never read from disk: :func:`make_noise_scheduler` always builds SD v1.x's *training*
schedule (scaled-linear betas 0.00085 -> 0.012, 1000 steps, epsilon prediction), which is what kohya's trainer
does too. A folder's ``scheduler/scheduler_config.json`` is only checked: a v-prediction model is refused, other
differences (often an inference scheduler such as PNDM) are logged and ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError
from library.fileio import atomic_write_path
from library.sd.text import (
    clip_tokenizer_from_bpe_file,
    tokenizer_from_dict,
    tokenizer_to_dict,
)

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "sd_v1"

# Safetensors metadata keys written by save_single_file (values are JSON strings).
META_CONFIGS = "smp_lora.sd_configs"
META_TOKENIZER = "smp_lora.tokenizer"
META_FORMAT = "smp_lora.format"

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."

# SD v1.x training schedule (CompVis v1-inference.yaml: linear_start 0.00085, linear_end 0.012, 1000 steps).
SCHEDULER_SETTINGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "prediction_type": "epsilon",
    # steps_offset=1 matches SD's released scheduler configs (and avoids a diffusers deprecation warning).
    "steps_offset": 1,
}

# Built-in SD v1.5 configs, used for single files that carry no configs in their metadata.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14 text tower as shipped in SD v1.5's text_encoder/config.json (bos 0 / eos 2 are the legacy ids
# of that config; they only select how the unused pooled output is computed).
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# The CLIPTextConfig fields that define the network. Configs are reduced to these for metadata and
# fingerprints, so bookkeeping fields that vary across transformers versions (dtype, version, name) don't matter.
TEXT_ENCODER_CONFIG_KEYS = tuple(SD15_TEXT_ENCODER_CONFIG)

_REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


@dataclass
class ModelBundle:
    """The pieces of an SD v1.x model that training and evaluation need, plus where they came from."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str
    base_model_version: str = BASE_MODEL_VERSION

    def fingerprint(self) -> str:
        """See :func:`fingerprint`."""
        return fingerprint(self)


# --------------------------------------------------------------------------------------------------- scheduler


def make_noise_scheduler() -> Any:
    """SD v1.x's training noise schedule as a ``DDPMScheduler`` (never read from disk, see module docstring)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_SETTINGS)


def _check_scheduler_config(folder: Path) -> None:
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc}); fix or delete it") from exc
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelError(
            f"{config_file} says prediction_type={config['prediction_type']!r}; smp-lora trains SD v1.x "
            "epsilon-prediction models only (v-prediction SD 2.x models are not supported)"
        )
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end"):
        if key in config and config[key] != SCHEDULER_SETTINGS[key]:
            logger.warning(
                "%s has %s=%r; training uses SD v1.x's %r regardless", config_file, key, config[key],
                SCHEDULER_SETTINGS[key],
            )


# ------------------------------------------------------------------------------------------------- fingerprints


def _diffusers_config(model: Any) -> dict[str, Any]:
    """A diffusers model's config without bookkeeping keys (``_class_name``, ``_name_or_path``, ...)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def _text_encoder_config(text_encoder: Any) -> dict[str, Any]:
    config = text_encoder.config
    return {key: getattr(config, key) for key in TEXT_ENCODER_CONFIG_KEYS if hasattr(config, key)}


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr).encode("utf-8")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _hash_module(digest: Any, name: str, config: dict[str, Any], module: torch.nn.Module) -> None:
    digest.update(_canonical_json({"component": name, "class": type(module).__name__, "config": config}))
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(f"\n{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
        digest.update(_tensor_bytes(tensor))


def vae_fingerprint(vae: Any) -> str:
    """Hex sha256 of the VAE's class, config and exact weights (dtype included); latent caches are keyed by it."""
    digest = hashlib.sha256()
    _hash_module(digest, "vae", _diffusers_config(vae), vae)
    return digest.hexdigest()


def fingerprint(bundle: ModelBundle) -> str:
    """A deterministic hex id of everything that shapes the model's outputs.

    It hashes (sha256) each network's class, architecture config and **every weight's exact bytes** (with
    names, dtypes and shapes), the tokenizer's vocabulary, merges and window, and the noise schedule. Exact
    content hashing was chosen over sampled statistics because it never misses a change (one perturbed weight
    changes it) and it is cheap next to loading: sha256 runs at about 1.7 GB/s on one CPU core, so SD v1.5
    (4.3 GB in fp32, half that in fp16) takes about 2-4 s on a 2-core box, the VAE alone about 0.3 s. The same
    weights in another dtype give another id, which is intended: their outputs differ. Device and
    ``requires_grad`` do not matter; injected LoRA layers would (they are in the state dict), so fingerprint the
    base model before adding them.
    """
    digest = hashlib.sha256()
    digest.update(_canonical_json({"base_model_version": bundle.base_model_version}))
    _hash_module(digest, "unet", _diffusers_config(bundle.unet), bundle.unet)
    _hash_module(digest, "vae", _diffusers_config(bundle.vae), bundle.vae)
    _hash_module(digest, "text_encoder", _text_encoder_config(bundle.text_encoder), bundle.text_encoder)
    digest.update(_canonical_json({"tokenizer": tokenizer_to_dict(bundle.tokenizer)}))
    digest.update(_canonical_json({"scheduler": _diffusers_config(bundle.noise_scheduler)}))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ diffusers -> LDM keys

_UNET_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{_UNET_RESNET_TO_LDM.get(module, module)}.{param}"


def _unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers UNet2DConditionModel state-dict key.

    LDM numbers blocks sequentially: ``input_blocks.0`` is conv_in, then every down-block contributes
    ``layers_per_block`` (resnet[, attention]) entries plus one downsampler entry; up-blocks contribute
    ``layers_per_block + 1`` entries, the last of which also holds the upsampler (after the attention if any).
    """
    per_down = int(config["layers_per_block"]) + 1
    for diffusers_name, ldm_name in _UNET_TOP_LEVEL_TO_LDM.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * per_down + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        index = 1 + int(match[1]) * per_down + per_down - 1
        return f"input_blocks.{index}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per_down + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        index = block * per_down + per_down - 1
        slot = 2 if str(config["up_block_types"][block]).startswith("CrossAttn") else 1
        return f"output_blocks.{index}.{slot}.conv.{match[2]}"
    raise ModelError(f"cannot write UNet tensor {key!r} in the SD v1.x single-file layout (not an SD v1.x UNet?)")


def _vae_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers AutoencoderKL state-dict key.

    LDM's decoder numbers its up-blocks from the lowest resolution, the reverse of diffusers' order.
    """
    num_up = len(config["up_block_types"])
    for side in ("encoder", "decoder"):
        if key in (f"{side}.conv_norm_out.weight", f"{side}.conv_norm_out.bias"):
            return key.replace("conv_norm_out", "norm_out")
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = num_up - 1 - int(match[1])
        return f"decoder.up.{block}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        module = _VAE_ATTENTION_TO_LDM.get(match[2])
        if module is not None:
            return f"{match[1]}.mid.attn_1.{module}.{match[3]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", key) or re.fullmatch(
        r"(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    raise ModelError(f"cannot write VAE tensor {key!r} in the SD v1.x single-file layout (not an SD v1.x VAE?)")


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under their LDM names (``model.diffusion_model.*``)."""
    config = dict(unet.config)
    return {LDM_UNET_PREFIX + _unet_key_to_ldm(key, config): t for key, t in unet.state_dict().items()}


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under their LDM names (``first_stage_model.*``).

    The mid-block attention's q/k/v/proj_out weights become 1x1 conv kernels ``(C, C, 1, 1)`` as in LDM,
    where diffusers keeps them as Linear ``(C, C)`` matrices.
    """
    config = dict(vae.config)
    state = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(key, config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[LDM_VAE_PREFIX + ldm_key] = tensor
    return state


def text_encoder_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights under their LDM names (``cond_stage_model.transformer.text_model.*``)."""
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        # Flattened (transformers >= 5.6) CLIPTextModel keys lack the ``text_model.`` level LDM files have.
        name = key if key.startswith("text_model.") else "text_model." + key
        state[LDM_TEXT_PREFIX + name] = tensor
    return state


def to_ldm_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The three networks' weights under their original LDM (CompVis / A1111) names, in one dict."""
    return {**unet_to_ldm(bundle.unet), **vae_to_ldm(bundle.vae), **text_encoder_to_ldm(bundle.text_encoder)}


def save_single_file(bundle: ModelBundle, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``bundle`` as ONE LDM-layout ``.safetensors`` (configs and tokenizer in its metadata), atomically.

    ``dtype`` optionally casts the floating-point weights (e.g. ``torch.float16`` halves the file).
    """
    from safetensors.torch import save_file

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
        "unet": _diffusers_config(bundle.unet),
        "vae": _diffusers_config(bundle.vae),
        "text_encoder": _text_encoder_config(bundle.text_encoder),
    }
    metadata = {
        META_FORMAT: "1",
        META_CONFIGS: json.dumps(configs, sort_keys=True),
        META_TOKENIZER: json.dumps(tokenizer_to_dict(bundle.tokenizer)),
        "modelspec.architecture": "stable-diffusion-v1",
        "ss_base_model_version": bundle.base_model_version,
    }
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------------------ loading


def _assemble(tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, dtype: torch.dtype, *, source: str) -> ModelBundle:
    """The loaded parts, frozen and cast (:func:`_finish`), with SD's training noise scheduler."""
    return ModelBundle(
        tokenizer=tokenizer,
        text_encoder=_finish(text_encoder, dtype),
        vae=_finish(vae, dtype),
        unet=_finish(unet, dtype),
        noise_scheduler=make_noise_scheduler(),
        source=source,
    )


def _finish(module: Any, dtype: torch.dtype) -> Any:
    """Frozen, eval-mode, in ``dtype``: the trainer enables gradients only on what it trains."""
    # Cast only when needed: diffusers warns on every ``.to(dtype)``, even a no-op one.
    if any(t.is_floating_point() and t.dtype != dtype for t in module.state_dict().values()):
        module.to(dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _load_tokenizer_folder(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise ModelError(f"tokenizer folder {folder} does not exist; pass a folder holding a CLIP tokenizer")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        raise ModelError(f"could not load a CLIP tokenizer from {folder} ({_first_line(exc)})") from exc


def _check_stack(bundle: ModelBundle, source: Path) -> None:
    """Cross-component checks that catch SD 2.x / SDXL / inpainting models and mismatched tokenizers."""
    unet_cfg, te_cfg = bundle.unet.config, bundle.text_encoder.config
    if unet_cfg.get("addition_embed_type") or unet_cfg.get("use_linear_projection"):
        raise ModelError(f"{source} looks like an SD 2.x / SDXL model; smp-lora supports SD v1.x only")
    if unet_cfg["cross_attention_dim"] != te_cfg.hidden_size:
        raise ModelError(
            f"{source}: the UNet expects {unet_cfg['cross_attention_dim']}-dim text states but the text encoder "
            f"gives {te_cfg.hidden_size}; the components do not belong together"
        )
    if unet_cfg["in_channels"] != bundle.vae.config["latent_channels"]:
        raise ModelError(
            f"{source}: the UNet takes {unet_cfg['in_channels']} input channels but the VAE makes "
            f"{bundle.vae.config['latent_channels']}-channel latents (inpainting models are not supported)"
        )
    if len(bundle.tokenizer) > te_cfg.vocab_size:
        raise ModelError(
            f"{source}: the tokenizer has {len(bundle.tokenizer)} tokens but the text encoder only "
            f"{te_cfg.vocab_size} embeddings; pass the tokenizer that belongs to this model (--tokenizer_path)"
        )


def _load_folder(folder: Path, tokenizer_path: Path | None, dtype: torch.dtype) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub in _REQUIRED_SUBFOLDERS + (() if tokenizer_path else ("tokenizer",)):
        if not (folder / sub).is_dir():
            raise ModelError(
                f"{folder} is not a diffusers Stable Diffusion folder: subfolder '{sub}/' is missing "
                "(expected unet/, vae/, text_encoder/ and tokenizer/ as written by "
                "StableDiffusionPipeline.save_pretrained)"
            )
    _check_scheduler_config(folder)

    def load(sub: str, loader: Any) -> Any:
        try:
            return loader()
        except ModelError:
            raise
        except Exception as exc:  # missing weights, corrupt safetensors, bad config.json, ...
            raise ModelError(
                f"could not load {folder / sub} ({_first_line(exc)}); the files may be incomplete or corrupt: "
                "download or save the model again"
            ) from exc

    unet = load(
        "unet",
        lambda: UNet2DConditionModel.from_pretrained(
            str(folder), subfolder="unet", local_files_only=True, torch_dtype=dtype
        ),
    )
    vae = load(
        "vae",
        lambda: AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True, torch_dtype=dtype),
    )
    text_encoder = load(
        "text_encoder",
        lambda: CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True, dtype=dtype),
    )
    tokenizer = _load_tokenizer_folder(tokenizer_path or folder / "tokenizer")
    return _assemble(tokenizer, text_encoder, vae, unet, dtype, source=str(folder))


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle_cm = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError (bad header, truncated), OSError
        raise ModelError(
            f"{path} is not a readable .safetensors file ({_first_line(exc)}); it may be truncated or corrupt: "
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
        return _load_tokenizer_folder(tokenizer_path)
    if META_TOKENIZER in metadata:
        data = _read_json_metadata(path, metadata, META_TOKENIZER)
        try:
            return tokenizer_from_dict(data)
        except Exception as exc:
            raise ModelError(f"{path}: the tokenizer in its metadata is unusable ({_first_line(exc)})") from exc
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


def _load_single_file(path: Path, tokenizer_path: Path | None, dtype: torch.dtype) -> ModelBundle:
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
                f"{path} could not be read ({_first_line(exc)}); it may be truncated or corrupt: download or "
                "export it again"
            ) from exc

    try:
        unet = _meta_model(UNet2DConditionModel, configs["unet"])
        vae = _meta_model(AutoencoderKL, configs["vae"])
        te_config = CLIPTextConfig(**configs["text_encoder"])
        with torch.device("meta"):
            te_meta = CLIPTextModel(te_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: the model configs in its metadata are unusable ({_first_line(exc)})") from exc

    try:
        unet_sd = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
        vae_sd = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
        te_sd = convert_ldm_clip_checkpoint(checkpoint)
    except Exception as exc:  # the converters index blocks by config; a different layout fails inside them
        raise ModelError(
            f"{path} does not look like an SD v1.x checkpoint (its tensors do not fit the SD v1.x layout: "
            f"{_first_line(exc)}){hint}"
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
    return _assemble(tokenizer, text_encoder, vae, unet, dtype, source=str(path))


def load_sd_model(
    path: str | Path, *, tokenizer_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> ModelBundle:
    """Load an SD v1.x model from a local diffusers folder or a single LDM-layout ``.safetensors`` file.

    ``tokenizer_path`` (a local folder with a CLIP tokenizer) overrides the model's own tokenizer; single files
    otherwise use the tokenizer in their metadata, or the CLIP BPE file of an installed ``open_clip``. The three
    networks come back in eval mode with gradients disabled. Never touches the network.
    """
    path = Path(path).expanduser()
    tok_path = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; pass a diffusers folder or an SD v1.x .safetensors file")
    if path.is_dir():
        bundle = _load_folder(path, tok_path, dtype)
    elif path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(
            f"{path} is a pickle-based checkpoint, which smp-lora does not load (unpickling can run code); "
            "convert it to .safetensors first"
        )
    elif path.suffix.lower() == ".safetensors":
        bundle = _load_single_file(path, tok_path, dtype)
    else:
        raise ModelError(f"{path} is neither a diffusers folder nor a .safetensors checkpoint")
    _check_stack(bundle, path)
    logger.info("loaded SD v1.x model from %s", path)
    return bundle


__all__ = [
    "BASE_MODEL_VERSION",
    "ModelBundle",
    "fingerprint",
    "load_sd_model",
    "make_noise_scheduler",
    "save_single_file",
    "text_encoder_to_ldm",
    "to_ldm_state_dict",
    "unet_to_ldm",
    "vae_to_ldm",
    "vae_fingerprint",
]
