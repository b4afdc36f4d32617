"""Load Stable Diffusion v1.x offline: a diffusers folder or one single-file checkpoint.

:func:`load_sd_model` accepts

* a local **diffusers folder** (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, as written by
  ``StableDiffusionPipeline.save_pretrained``), loaded here with ``local_files_only=True``;
* a **single-file** ``.safetensors`` checkpoint in the original LDM key layout, read by
  :func:`library.sd.single_file.load_single_file`.

One rule for pickle weights (unpickling can run code): a ``.ckpt``/``.pt``/``.bin`` single file and a folder whose
networks are stored only as pickle ``.bin`` files are refused unless ``allow_pickle=True`` (``--allow_pickle``); with
it, folders fall back to their ``.bin`` files and ``.ckpt`` files are read like ``.safetensors`` ones.
:func:`check_sd_model` runs every check that needs no weights (folder layout, weight formats, a single file's
header and tokenizer), so the entry scripts can fail in a moment instead of after loading gigabytes.

The noise scheduler is never read from disk (:func:`library.sd.bundle.make_noise_scheduler` builds SD v1.x's
training schedule, as kohya's trainer does). A folder's ``scheduler/scheduler_config.json`` is only checked: a
v-prediction model is refused, other differences (often an inference scheduler such as PNDM) are logged and
ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError
from library.sd.bundle import (
    ModelBundle,
    assemble_bundle,
    check_tokenizer_folder,
    first_line,
    load_tokenizer_folder,
)
from library.sd.configs import SCHEDULER_SETTINGS
from library.sd.single_file import (
    check_single_file,
    load_single_file,
    single_file_configs,
)

logger = logging.getLogger(__name__)

_REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder")
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_PICKLE_HINT = "pass --allow_pickle (allow_pickle=True) only if you trust the files: unpickling can run code"


def _check_scheduler_config(folder: Path) -> None:
    """Refuse a v-prediction ``scheduler_config.json``; log (and ignore) other schedule differences."""
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


def _check_weight_format(folder: Path, allow_pickle: bool) -> None:
    """Each network's subfolder must hold ``.safetensors`` weights, or pickle ones with ``allow_pickle``."""
    for sub in _REQUIRED_SUBFOLDERS:
        files = [p for p in (folder / sub).iterdir() if p.is_file()]
        if any(p.suffix == ".safetensors" for p in files):
            continue
        pickles = sorted(p.name for p in files if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles and not allow_pickle:
            raise ModelError(
                f"{folder / sub} holds only pickle weights ({pickles[0]}); smp-lora loads .safetensors weights "
                f"only: save the model again with safe_serialization=True, or {_PICKLE_HINT}"
            )
        if not pickles:
            raise ModelError(
                f"{folder / sub} holds no weights (no .safetensors file); the download or save is incomplete: "
                "download or save the model again"
            )


def _weights_variant(folder: Path) -> str | None:
    """The weight variant to load from ``folder``: None when it holds plain ``<name>.safetensors`` weights, else
    the variant of its ``<name>.<variant>.safetensors`` files (e.g. ``fp16``, as a download of SD v1.5's fp16
    files only leaves them; ``fp16`` first if there are several)."""
    names = [p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(".safetensors")]
    if any(name.count(".") == 1 for name in names):
        return None
    variants = sorted({name.split(".")[-2] for name in names}, key=lambda v: (v != "fp16", v))
    return variants[0] if variants else None


def _check_folder(folder: Path, tokenizer_path: Path | None, allow_pickle: bool) -> None:
    for sub in _REQUIRED_SUBFOLDERS + (() if tokenizer_path else ("tokenizer",)):
        if not (folder / sub).is_dir():
            raise ModelError(
                f"{folder} is not a diffusers Stable Diffusion folder: subfolder '{sub}/' is missing "
                "(expected unet/, vae/, text_encoder/ and tokenizer/ as written by "
                "StableDiffusionPipeline.save_pretrained)"
            )
    if tokenizer_path is not None:
        check_tokenizer_folder(tokenizer_path)
    _check_weight_format(folder, allow_pickle)
    _check_scheduler_config(folder)


def _load_folder(folder: Path, tokenizer_path: Path | None, dtype: torch.dtype, allow_pickle: bool) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    # True: never fall back to a pickle file; None: the libraries' default (safetensors first, then .bin).
    safetensors_only = None if allow_pickle else True

    def load(sub: str, loader: Any) -> Any:
        try:
            return loader()
        except ModelError:
            raise
        except Exception as exc:  # missing weights, corrupt safetensors, bad config.json, ...
            raise ModelError(
                f"could not load {folder / sub} ({first_line(exc)}); the files may be incomplete or corrupt: "
                "download or save the model again"
            ) from exc

    unet = load(
        "unet",
        lambda: UNet2DConditionModel.from_pretrained(
            str(folder), subfolder="unet", local_files_only=True, torch_dtype=dtype, use_safetensors=safetensors_only,
            variant=_weights_variant(folder / "unet"),
        ),
    )
    vae = load(
        "vae",
        lambda: AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True, torch_dtype=dtype,
                                              use_safetensors=safetensors_only, variant=_weights_variant(folder / "vae")),
    )
    text_encoder = load(
        "text_encoder",
        lambda: CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True, dtype=dtype,
                                              use_safetensors=safetensors_only,
                                              variant=_weights_variant(folder / "text_encoder")),
    )
    tokenizer = load_tokenizer_folder(tokenizer_path or folder / "tokenizer")
    return assemble_bundle(tokenizer, text_encoder, vae, unet, dtype, source=str(folder))


def check_sd_model(
    path: str | Path, *, tokenizer_path: str | Path | None = None, allow_pickle: bool = False
) -> None:
    """Every check of :func:`load_sd_model` that reads no weights; one :class:`ModelError` naming the problem.

    Folders: the four subfolders, safetensors weights (or pickle ones with ``allow_pickle``), the scheduler
    config. Single files: the suffix (pickle only with ``allow_pickle``), the header and key layout of a
    ``.safetensors``, and a tokenizer (``tokenizer_path``, the file's metadata or an installed ``open_clip``).
    Costs a directory listing or a header read: call it before any long work.
    """
    path = Path(path).expanduser()
    tok_path = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    if not path.exists():
        raise ModelError(f"model path {path} does not exist; pass a diffusers folder or an SD v1.x .safetensors file")
    if path.is_dir():
        _check_folder(path, tok_path, allow_pickle)
    elif path.suffix.lower() in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickle-based checkpoint, which smp-lora does not load by default (unpickling can run "
                f"code); convert it to .safetensors first, or {_PICKLE_HINT}"
            )
    elif path.suffix.lower() == ".safetensors":
        check_single_file(path, tok_path)
    else:
        raise ModelError(f"{path} is neither a diffusers folder nor a .safetensors checkpoint")


def _network_config(path: Path, name: str) -> dict[str, Any]:
    """The config of one network (``unet``, ``vae``, ``text_encoder``) of a model folder or single ``.safetensors``,
    read from its files alone; OSError / ValueError / KeyError / ModelError when they do not hold it."""
    if path.is_dir():
        return json.loads((path / name / "config.json").read_text(encoding="utf-8"))
    if path.suffix.lower() == ".safetensors":
        return single_file_configs(path)[name]
    raise KeyError(name)


def native_resolution(path: str | Path) -> int | None:
    """The image size an SD v1.x model generates by default (diffusers' pipelines: the UNet's ``sample_size`` times
    the VAE's downscale, 64 x 8 = 512 for SD v1.5), from its configs alone; None when they do not say."""
    path = Path(path).expanduser()
    try:
        unet, vae = _network_config(path, "unet"), _network_config(path, "vae")
        size, levels = int(unet["sample_size"]), len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError, ModelError):
        return None  # check_sd_model names what is wrong with the model; here it only has no default size
    return size * 2 ** (levels - 1) if size > 0 and levels > 0 else None


def text_encoder_layers(path: str | Path) -> int | None:
    """The number of layers of a model's CLIP text encoder (what ``--clip_skip`` counts), from its config alone;
    None when it does not say (the check then waits for the loaded model)."""
    try:
        return int(_network_config(Path(path).expanduser(), "text_encoder")["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ModelError):
        return None


def load_sd_model(
    path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelBundle:
    """Load an SD v1.x model from a local diffusers folder or a single LDM-layout ``.safetensors`` file.

    ``tokenizer_path`` (a local folder with a CLIP tokenizer) overrides the model's own tokenizer; single files
    otherwise use the tokenizer in their metadata, or the CLIP BPE file of an installed ``open_clip``.
    ``allow_pickle`` also loads pickle weights (a ``.ckpt`` file, a folder with only ``.bin`` files): only for
    files you trust. :func:`check_sd_model` runs first, so bad input fails before any weight is read. The
    three networks come back in eval mode with gradients disabled. Never touches the network.
    """
    check_sd_model(path, tokenizer_path=tokenizer_path, allow_pickle=allow_pickle)
    path = Path(path).expanduser()
    tok_path = Path(tokenizer_path).expanduser() if tokenizer_path is not None else None
    # A single file's networks are built from their configs first, which draws a (discarded) random
    # initialisation from torch's global generator; a folder draws none. The fork leaves a seeded stream, and with
    # it the LoRA's initialisation, as it was: the same weights train the same LoRA in either format.
    with torch.random.fork_rng(devices=[]):
        if path.is_dir():
            bundle = _load_folder(path, tok_path, dtype, allow_pickle)
        else:
            bundle = load_single_file(path, tok_path, dtype, allow_pickle=allow_pickle)
    _check_stack(bundle, path)
    logger.info("loaded SD v1.x model from %s", path)
    return bundle
