"""One ``.safetensors`` file in the original LDM key layout: reading it as a :class:`ModelBundle`, writing one.

:func:`load_single_file` reads a checkpoint such as ``v1-5-pruned.safetensors`` (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``). LDM -> diffusers renaming uses diffusers'
own converters from ``diffusers.loaders.single_file_utils``; the configs come from the file's metadata
(``smp_lora.sd_configs``, written by :func:`save_single_file`) or, for files from elsewhere, from the SD v1.5
configs of :mod:`library.sd.configs`, so nothing is fetched from the Hub. Every tensor is shape-checked against
the config before any weight is materialised, so a wrong file gives one :class:`~library.errors.ModelError`
rather than a traceback from deep inside ``load_state_dict``. The tokenizer is resolved from the header before
any tensor is read (:func:`check_tokenizer_source`), so a file without one fails at once. A pickle ``.ckpt`` in
the same layout is read only with ``allow_pickle`` (see :mod:`library.sd.loading`).

:func:`save_single_file` writes the reverse: one LDM-layout ``.safetensors`` holding the three networks (names
from :mod:`library.sd.ldm_keys`), with the configs and the tokenizer in its metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError, warn
from library.fileio import write_safetensors
from library.sd.bundle import (
    ModelBundle,
    assemble_bundle,
    check_tokenizer_folder,
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
_NETWORK_PREFIXES = (LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX)


def save_single_file(bundle: ModelBundle, path: str | Path, *, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``bundle`` as ONE LDM-layout ``.safetensors`` (configs and tokenizer in its metadata), atomically.

    ``dtype`` optionally casts the floating-point weights (e.g. ``torch.float16`` halves the file); ``metadata``
    adds header entries (a fine-tune's training settings) under the ones this function writes.
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
    header = {
        **(metadata or {}),
        META_FORMAT: "1",
        META_CONFIGS: json.dumps(configs, sort_keys=True),
        META_TOKENIZER: json.dumps(tokenizer_to_dict(bundle.tokenizer)),
        "modelspec.architecture": "stable-diffusion-v1",
        "ss_base_model_version": bundle.base_model_version,
    }
    write_safetensors(path, tensors, header)
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


def _classify_single_file(path: Path, keys: list[str], *, need_vae: bool = True) -> None:
    """Refuse files that are clearly not an SD v1.x checkpoint, with a message saying what they look like
    (``need_vae=False``: a checkpoint saved without its VAE passes, for :mod:`library.sd.bake_vae`)."""
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelError(f"{path} looks like an SDXL checkpoint; smp-lora supports SD v1.x only")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelError(f"{path} looks like an SD 2.x checkpoint (OpenCLIP text encoder); smp-lora supports SD v1.x")
    if any(k.startswith(("lora_unet_", "lora_te_", "unet.")) or ".lora_" in k for k in keys[:1000]):
        raise ModelError(
            f"{path} looks like a LoRA file, not a base model; pass the SD v1.x checkpoint it was made for"
        )
    if not any(k.startswith("model.") for k in keys) and any(k.startswith(("encoder.", "decoder.")) for k in keys):
        raise ModelError(f"{path} looks like a VAE file, not a base model; pass the SD v1.x checkpoint (to put this "
                         "VAE into one: python scripts/bake_vae.py)")
    required = (LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX) if need_vae else (LDM_UNET_PREFIX, LDM_TEXT_PREFIX)
    missing = [p for p in required if not any(k.startswith(p) for k in keys)]
    if missing == [LDM_VAE_PREFIX]:
        raise ModelError(
            f"{path} holds a UNet and a text encoder but no VAE (no '{LDM_VAE_PREFIX}*' tensors: a checkpoint saved "
            f"without one); put a VAE into it: python scripts/bake_vae.py --checkpoint {path} --vae VAE.safetensors "
            "--output NEW.safetensors"
        )
    if missing:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise ModelError(
            f"{path} does not look like an SD v1.x checkpoint (no '{missing[0]}*' tensors; it has e.g. {sample})"
        )


def _note_ema(path: Path, keys: list[str]) -> None:
    """Say which UNet a file holding two is read as (diffusers' converter says it too; ours reads no EMA key)."""
    if any(k.startswith("model_ema.diffusion_model") for k in keys):
        warn(f"{path} also holds EMA weights (model_ema.*): its non-EMA UNet (model.diffusion_model.*) is used, as "
             "kohya sd-scripts and AUTOMATIC1111 use it; a diffusers folder converted from it may hold the EMA UNet "
             "instead (diffusers' extract_ema), which is another base model: evaluate with the form you trained on")


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


def _open_clip_bpe() -> Path | None:
    """The CLIP BPE vocabulary an installed ``open_clip`` ships, found without importing it (it needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bpe = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
            if bpe.is_file():
                return bpe
    return None


def check_tokenizer_source(path: Path, metadata: Mapping[str, str], tokenizer_path: Path | None) -> None:
    """Refuse, before any tensor is read, a single file that carries no tokenizer when none is given either.

    The sources, in order: ``tokenizer_path``, the tokenizer in the file's metadata, an installed
    ``open_clip``'s BPE file. Checking them costs a header read; loading the whole model first would cost
    seconds to minutes before the same error.
    """
    if tokenizer_path is not None:
        check_tokenizer_folder(tokenizer_path)
        return
    if META_TOKENIZER in metadata or _open_clip_bpe() is not None:
        return
    raise ModelError(
        f"{path} carries no tokenizer: pass --tokenizer_path with a local CLIP tokenizer folder (e.g. the "
        "tokenizer/ folder of a diffusers SD v1.5 download), or `pip install --no-deps open_clip_torch`, "
        "which ships the CLIP BPE vocabulary"
    )


def _single_file_tokenizer(path: Path, metadata: Mapping[str, str], tokenizer_path: Path | None) -> Any:
    check_tokenizer_source(path, metadata, tokenizer_path)
    if tokenizer_path is not None:
        return load_tokenizer_folder(tokenizer_path)
    if META_TOKENIZER in metadata:
        data = _read_json_metadata(path, metadata, META_TOKENIZER)
        try:
            return tokenizer_from_dict(data)
        except Exception as exc:
            raise ModelError(f"{path}: the tokenizer in its metadata is unusable ({first_line(exc)})") from exc
    bpe = _open_clip_bpe()
    assert bpe is not None  # check_tokenizer_source found it
    return clip_tokenizer_from_bpe_file(bpe)


def _configs(path: Path, metadata: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """(the networks' configs, a hint for shape errors): from the file's metadata, else SD v1.5's."""
    if META_CONFIGS in metadata:
        return _read_json_metadata(path, metadata, META_CONFIGS), ""
    configs = {"unet": SD15_UNET_CONFIG, "vae": SD15_VAE_CONFIG, "text_encoder": SD15_TEXT_ENCODER_CONFIG}
    return configs, "; files without smp-lora metadata are read with the SD v1.5 architecture"


def single_file_configs(path: Path) -> dict[str, Any]:
    """The networks' configs of a single ``.safetensors`` (its metadata's, else SD v1.5's), reading no tensor."""
    with _open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
    return _configs(path, metadata)[0]


def check_single_file(path: Path, tokenizer_path: Path | None) -> None:
    """The cheap checks of :func:`load_single_file` (header, key layout, configs, tokenizer), reading no tensor."""
    with _open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        _classify_single_file(path, list(handle.keys()))
    _configs(path, metadata)
    check_tokenizer_source(path, metadata, tokenizer_path)


def _read_safetensors(path: Path, tokenizer_path: Path | None) -> tuple[dict[str, str], Any, dict[str, torch.Tensor]]:
    """``(metadata, tokenizer, the three networks' tensors)`` of a single ``.safetensors``; the tokenizer is
    resolved before any tensor is read, so a file without one fails in a moment."""
    with _open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        _classify_single_file(path, keys)
        _note_ema(path, keys)
        tokenizer = _single_file_tokenizer(path, metadata, tokenizer_path)
        # Only the three networks' tensors are read: EMA copies and schedule buffers in the file are skipped.
        try:
            checkpoint = {key: handle.get_tensor(key) for key in keys if key.startswith(_NETWORK_PREFIXES)}
        except Exception as exc:
            raise ModelError(
                f"{path} could not be read ({first_line(exc)}); it may be truncated or corrupt: download or "
                "export it again"
            ) from exc
    return metadata, tokenizer, checkpoint


def _read_pickle(path: Path, tokenizer_path: Path | None) -> tuple[dict[str, str], Any, dict[str, torch.Tensor]]:
    """The same from a pickle ``.ckpt`` (only with ``allow_pickle``: unpickling can run code).

    ``weights_only`` unpickling is tried first; a checkpoint that pickles other objects (a Lightning
    trainer's state) is then unpickled in full, which the caller's ``allow_pickle`` has consented to.
    """
    check_tokenizer_source(path, {}, tokenizer_path)
    try:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raw = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelError(f"{path} could not be unpickled ({first_line(exc)}); it may be truncated or corrupt") from exc
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping):
        raise ModelError(f"{path} holds a {type(raw).__name__}, not a state dict of an SD v1.x checkpoint")
    keys = [key for key in state if isinstance(key, str)]
    _classify_single_file(path, keys)
    _note_ema(path, keys)
    checkpoint = {k: state[k] for k in keys if k.startswith(_NETWORK_PREFIXES) and isinstance(state[k], torch.Tensor)}
    return {}, _single_file_tokenizer(path, {}, tokenizer_path), checkpoint


def load_single_file(
    path: Path, tokenizer_path: Path | None, dtype: torch.dtype, *, allow_pickle: bool = False
) -> ModelBundle:
    """Read one LDM-layout SD v1.x ``.safetensors`` (or, with ``allow_pickle``, a ``.ckpt``) as a frozen
    :class:`ModelBundle` in ``dtype``."""
    if path.suffix.lower() == ".safetensors":
        metadata, tokenizer, checkpoint = _read_safetensors(path, tokenizer_path)
    elif allow_pickle:
        metadata, tokenizer, checkpoint = _read_pickle(path, tokenizer_path)
    else:
        raise ModelError(f"{path} is not a .safetensors file; pickle checkpoints load only with allow_pickle")
    text_encoder, vae, unet = _networks(path, checkpoint, *_configs(path, metadata), dtype)
    return assemble_bundle(tokenizer, text_encoder, vae, unet, dtype, source=str(path))


def _networks(path: Path, checkpoint: dict[str, torch.Tensor], configs: Mapping[str, Any], hint: str,
              dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """(text encoder, VAE, UNet) built from ``configs`` and loaded with the converted LDM ``checkpoint``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

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
    checkpoint.clear()  # consumed: drop the references to tensors no network adopted
    conv_in = unet_sd.get("conv_in.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] == 9:
        raise ModelError(f"{path} looks like an inpainting checkpoint (its UNet takes 9 input channels: latents, "
                         "mask and masked image); inpainting models are not supported")

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
    return text_encoder, vae, unet
