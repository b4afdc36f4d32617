"""A kohya-compatible LoRA network for Stable Diffusion v1.x (diffusers UNet + transformers CLIP).

The public names follow sd-scripts' ``networks.lora`` (``create_network``, ``create_network_from_weights``,
``LoRANetwork.apply_to`` / ``prepare_optimizer_params`` / ``save_weights`` / ``load_weights`` / ``merge_to``)
so sd-scripts users feel at home, and the files it writes are plain kohya LoRA files that diffusers'
``load_lora_weights``, ComfyUI and AUTOMATIC1111 load as they are:

* keys ``lora_unet_<diffusers module path, '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}`` and
  ``lora_te_text_model_encoder_layers_<i>_{self_attn_{q,k,v,out}_proj, mlp_fc{1,2}}.…``;
* ``lora_down`` is ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (conv: the layer's own kernel, stride and
  padding), ``lora_up`` ``[out, r]`` or ``[out, r, 1, 1]``, ``alpha`` a 0-dim tensor; the layer computes
  ``W x + up(down(x)) * multiplier * alpha / r``;
* with ``--network_args conv_dim=R [conv_alpha=A]`` (sd-scripts' "LoCon" option) the ResNet blocks and the
  down/up-samplers are adapted too: their 3x3 convs at rank ``conv_dim``, their Linear / 1x1 layers
  (``time_emb_proj``, ``conv_shortcut``) at ``network_dim``, exactly as sd-scripts does;
* no other tensors, and metadata that never describes the (private) training set.

One deliberate difference from sd-scripts: :meth:`LoRANetwork.apply_to` registers each LoRA module as a
*child* of the layer it adapts (under the attribute name :data:`LORA_CHILD_NAME`) as well as patching that
layer's ``forward``. The LoRA therefore runs inside the UNet's own forward *and* its parameters belong to
the UNet's module tree, so ``accelerator.prepare(unet)`` / DDP all-reduces their gradients with no manual
step (sd-scripts needs one, because its network object is outside the model). Consequences a caller must
know while the network is applied:

* ``unet.state_dict()`` also holds ``…<layer>.lora.lora_down.weight`` etc. (call :meth:`LoRANetwork.restore`
  before saving a full UNet);
* ``unet.to(dtype)`` and ``unet.requires_grad_(False)`` reach the LoRA too — cast and freeze the base model
  *before* :meth:`apply_to` (or call :meth:`LoRANetwork.prepare_grad_etc` afterwards).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from library.errors import ConfigError, ModelError
from library.fileio import atomic_write_path

__all__ = [
    "FORBIDDEN_METADATA_KEYS",
    "LORA_CHILD_NAME",
    "LoRAModule",
    "LoRANetwork",
    "LoadInfo",
    "check_metadata",
    "create_network",
    "create_network_from_weights",
    "find_target_layers",
    "load_lora_state_dict",
    "lora_file_sha256",
    "read_lora_metadata",
]

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
# kohya and A1111 name text-encoder layers after the transformers-4 module tree (``text_model.encoder…``);
# transformers 5's CLIPTextModel starts at ``encoder.…``, so the prefix is added back when naming keys.
_TE_KOHYA_ROOT = "text_model."

LORA_CHILD_NAME = "lora"
"""Attribute under which an applied LoRA module hangs off the layer it adapts."""

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"  # what sd-scripts writes today (sai_model_spec.py); older files say 1.0.0
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"
BASE_MODEL_VERSION = "sd_v1"

# Metadata that would leak facts about the private training set. sd-scripts writes these by default
# (directory names, per-caption tag counts, per-dataset image counts, bucket histograms); in a
# membership-privacy tool the LoRA file is the published artefact, so none of them may ever be in it.
FORBIDDEN_METADATA_KEYS: frozenset[str] = frozenset(
    {
        "ss_dataset_dirs",  # training folder names and image counts per folder
        "ss_reg_dataset_dirs",  # the same for regularisation images
        "ss_tag_frequency",  # every caption tag with its count: a summary of the captions
        "ss_datasets",  # JSON of datasets/subsets: image dirs, counts, tag frequencies, buckets
        "ss_bucket_info",  # per-resolution image counts
        "ss_num_train_images",  # exact size of the member set
        "ss_num_reg_images",
        "ss_num_batches_per_epoch",  # member-set size up to the batch size
        "ss_training_images",
        "ss_captions",
    }
)
# Key fragments that name captions, paths or datasets in any tool's vocabulary; checked as substrings of
# the lower-cased key so that spellings not in the exact list above are refused as well.
_FORBIDDEN_KEY_FRAGMENTS: tuple[str, ...] = (
    "dataset",
    "tag_frequency",
    "bucket_info",
    "data_dir",
    "image_dir",
    "img_dir",
    "train_dir",
    "captions",
    "caption_text",
    "filename",
    "file_name",
    "filepath",
    "file_path",
    "_path",
)
# A value that *is* an absolute file system path (POSIX, home-relative, Windows drive or UNC).
_PATH_VALUE = re.compile(r"^\s*(/|~[/\\]|[A-Za-z]:[/\\]|\\\\)")

_UNET_CONTAINER = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.")
# sd-scripts' UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: ResnetBlock2D, Downsample2D, Upsample2D.
_UNET_CONV_CONTAINER = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|downsamplers|upsamplers)\.\d+\."
)
_TE_TARGET = re.compile(
    r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"
)
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# --------------------------------------------------------------------------------------------------
# the LoRA layer
# --------------------------------------------------------------------------------------------------


class LoRAModule(nn.Module):
    """Low-rank update ``up(down(x)) * multiplier * alpha / rank`` for one Linear or Conv2d.

    For a conv, ``down`` has the layer's kernel, stride and padding and ``up`` is 1x1 (sd-scripts' layout).

    ``alpha`` is a buffer so that it travels in the state dict as ``<lora_name>.alpha`` (kohya format).
    """

    def __init__(
        self,
        lora_name: str,
        part: str,
        module_path: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank} for {lora_name}")
        self.lora_name = lora_name
        self.part = part  # "unet" or "text_encoder"
        self.module_path = module_path
        self.rank = int(rank)
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.kernel_size: tuple[int, ...] | None = tuple(org_module.kernel_size) if self.is_conv else None
        device = org_module.weight.device
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Conv2d(in_dim, self.rank, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False, device=device)
            self.lora_up = nn.Conv2d(self.rank, out_dim, 1, bias=False, device=device)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = nn.Linear(in_dim, self.rank, bias=False, device=device)
            self.lora_up = nn.Linear(self.rank, out_dim, bias=False, device=device)
        self.in_dim, self.out_dim = in_dim, out_dim
        # kohya / PEFT init: down like nn.Linear's default, up zero, so the network starts as the identity.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(self.rank if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32, device=device))
        # A Python float, not a tensor read per forward: reading the buffer would sync the GPU every call.
        self.scale = alpha / self.rank
        # Held in a tuple so nn.Module does not register the adapted layer as our child (that would make
        # the module tree cyclic once we are registered as *its* child).
        self._target: tuple[nn.Module, ...] = ()
        self.org_forward: Any = None

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Replacement forward of the adapted layer: the layer's own output plus the low-rank update."""
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out  # "LoRA off" costs nothing (used by MIA evaluation of the base model)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        h = self.lora_up(h)
        return out + (h * (self.multiplier * self.scale)).to(out.dtype)

    # -- patching ----------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return bool(self._target)

    def apply_to(self, org_module: nn.Module) -> None:
        """Patch ``org_module`` so that its forward runs the LoRA, and hang this module off it."""
        if self.applied:
            raise RuntimeError(f"LoRA {self.lora_name} is already applied; call restore() first")
        if LORA_CHILD_NAME in org_module._modules or "forward" in org_module.__dict__:
            raise RuntimeError(
                f"layer {self.module_path} already carries a LoRA or a patched forward; "
                "restore() the other network first"
            )
        self.org_forward = org_module.forward
        org_module.add_module(LORA_CHILD_NAME, self)
        org_module.forward = self.forward  # instance attribute shadows the class method
        self._target = (org_module,)

    def restore(self) -> None:
        """Undo :meth:`apply_to`: the layer gets its own forward back and loses the LoRA child."""
        if not self.applied:
            return
        org_module = self._target[0]
        if org_module.__dict__.get("forward") is not None:
            del org_module.__dict__["forward"]
        if org_module._modules.get(LORA_CHILD_NAME) is self:
            del org_module._modules[LORA_CHILD_NAME]
        self._target = ()
        self.org_forward = None

    # -- weights -----------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``alpha / rank * up @ down`` shaped like the adapted layer's weight (multiplier not applied)."""
        down = self.lora_down.weight.to(dtype).flatten(1)  # [r, in * kh * kw]
        up = self.lora_up.weight.to(dtype).flatten(1)  # [out, r]
        delta = (up @ down) * self.scale
        return delta.reshape(self.out_dim, self.in_dim, *self.kernel_size) if self.is_conv else delta

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(float(alpha))
        self.scale = float(alpha) / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Keep the cached Python scale in step with a loaded alpha, whichever load path was used.
        self.scale = float(self.alpha) / self.rank


# --------------------------------------------------------------------------------------------------
# target discovery and names
# --------------------------------------------------------------------------------------------------


def _is_target_layer(module: nn.Module, any_kernel: bool = False) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.dilation != (1, 1):
        return False
    return any_kernel or tuple(module.kernel_size) == (1, 1)


def _is_conv3x3(layer: nn.Module) -> bool:
    """A conv that gets ``conv_dim`` rather than ``network_dim`` (anything but 1x1, as in sd-scripts)."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def _lora_name(part: str, module_path: str) -> str:
    if part == "unet":
        return f"{LORA_PREFIX_UNET}_{module_path.replace('.', '_')}"
    if not module_path.startswith(_TE_KOHYA_ROOT):
        module_path = _TE_KOHYA_ROOT + module_path
    return f"{LORA_PREFIX_TEXT_ENCODER}_{module_path.replace('.', '_')}"


def _unwrap(model: Any) -> nn.Module:
    # accelerate / DDP / torch.compile wrap the model; the layer names live on the inner module.
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def find_target_layers(
    model: nn.Module | None, part: str, conv: bool = False
) -> dict[str, tuple[str, nn.Module]]:
    """``{lora_name: (module_path, layer)}`` for every layer a LoRA targets in ``model``.

    UNet: every Linear and 1x1 Conv2d inside the ``Transformer2DModel`` blocks (``*.attentions.<i>``: attn1/attn2
    q/k/v/out, ff, proj_in/out, mid block included); with ``conv`` also every Linear and conv of the ResNet
    blocks and down/up-samplers (sd-scripts' ``conv_dim`` targets). Text encoder: attention q/k/v/out and MLP
    fc1/fc2. Matching uses module paths plus layer types rather than class names, which change between versions.
    """
    if model is None:
        return {}
    model = _unwrap(model)
    targets: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        # LoRA layers of an applied network hang inside the adapted layers: never adapt those.
        if f".{LORA_CHILD_NAME}." in f".{path}." or isinstance(module, LoRAModule):
            continue
        if part == "unet":
            in_conv_block = conv and _UNET_CONV_CONTAINER.match(path) is not None
            if not (_UNET_CONTAINER.match(path) or in_conv_block):
                continue
            if not _is_target_layer(module, any_kernel=in_conv_block):
                continue
        elif not _is_target_layer(module):
            continue
        if part == "text_encoder" and not _TE_TARGET.match(path):
            continue
        targets[_lora_name(part, path)] = (path, module)
    return targets


# --------------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------------


def _describe(source: str | os.PathLike | None) -> str:
    return str(source) if source is not None else "<LoRA state dict>"


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA ``.safetensors`` file (CPU tensors); a missing or unreadable file raises ModelError."""
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist; check the path")
    if path.suffix.lower() != ".safetensors":
        raise ModelError(
            f"LoRA file {path} is not a .safetensors file; only safetensors LoRA files are read "
            "(pickled .pt/.ckpt files can run code when loaded) — convert it to safetensors first"
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for truncated / garbage files
        raise ModelError(
            f"LoRA file {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated — re-download or re-export it"
        ) from exc


def read_lora_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (``{}`` if it has none)."""
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist; check the path")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise ModelError(
            f"LoRA file {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated — re-download or re-export it"
        ) from exc


def _tensor_data_sha256(data: bytes) -> str:
    # The data region follows an 8-byte little-endian header length and the JSON header.
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


def lora_file_sha256(file: str | os.PathLike) -> str:
    """sha256 of the tensor data of a safetensors file, header (metadata) excluded.

    This is the ``sshs_model_hash`` that sd-scripts stores and the A1111 additional-networks extension shows:
    it identifies the weights and does not change when only the metadata is edited.
    """
    path = Path(file)
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist; check the path")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_len)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class _ModuleWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: tuple[str, ...]


def _normalise_lora_name(name: str) -> str:
    # Some exporters drop the transformers-4 "text_model_" root from text-encoder names; diffusers and
    # A1111 accept both spellings, so do we.
    if name.startswith("lora_te_encoder_"):
        return "lora_te_text_model_encoder_" + name[len("lora_te_encoder_") :]
    return name


def _foreign_format_hint(key: str) -> str:
    if "lora_A" in key or "lora_B" in key or key.startswith(("unet.", "text_encoder.")) or ".lora.down." in key:
        return (
            " — it looks like a diffusers/PEFT-format LoRA; this loader reads kohya-format files "
            "(lora_unet_*/lora_te_* keys). Load it with diffusers' load_lora_weights, or convert it"
        )
    if any(s in key for s in ("hada_", "lokr_", "dora_scale", "oft_", "lora_mid")):
        return " — it is a LyCORIS/DoRA-type network, which this LoRA loader does not support"
    return ""


def _group_kohya_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, _ModuleWeights]:
    """Group ``<name>.lora_down.weight / .lora_up.weight / .alpha`` by LoRA name; refuse anything else."""
    if not sd:
        raise ModelError(f"LoRA file {source} holds no tensors; it is not a LoRA file — re-export it")
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ModelError(
                f"LoRA file {source}: unexpected key '{key}' is not a kohya LoRA tensor "
                f"(<name>.lora_down.weight / .lora_up.weight / .alpha){_foreign_format_hint(key)}; "
                "the file was probably made for another model or tool"
            )
        name = _normalise_lora_name(key[: -len(suffix)])
        parts.setdefault(name, {"keys": []})
        parts[name][suffix] = tensor
        parts[name]["keys"].append(key)
    grouped: dict[str, _ModuleWeights] = {}
    for name, entry in parts.items():
        if ".lora_down.weight" not in entry or ".lora_up.weight" not in entry:
            missing = "lora_up" if ".lora_down.weight" in entry else "lora_down"
            raise ModelError(
                f"LoRA file {source}: '{entry['keys'][0]}' has no matching {missing} weight; "
                "the file is incomplete or corrupt — re-export it"
            )
        alpha_t = entry.get(".alpha")
        alpha = None if alpha_t is None else float(alpha_t.float().reshape(-1)[0])
        down, up = entry[".lora_down.weight"], entry[".lora_up.weight"]
        grouped[name] = _ModuleWeights(down, up, alpha, tuple(entry["keys"]))
    return grouped


def _layer_dims(layer: nn.Module) -> tuple[int, int, tuple[int, ...] | None]:
    """(in, out, conv kernel size or None for a Linear)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels, tuple(layer.kernel_size)
    return layer.in_features, layer.out_features, None


def _check_shapes(
    name: str, w: _ModuleWeights, in_dim: int, out_dim: int, kernel: tuple[int, ...] | None, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the file's tensors against the base layer; return them shaped like our LoRA weights."""
    down, up = w.down, w.up
    down_kernels = ((), (1, 1)) if kernel in (None, (1, 1)) else (kernel,)
    ok = (
        down.dim() in (2, 4)
        and up.dim() in (2, 4)
        and tuple(down.shape[2:]) in down_kernels
        and up.shape[2:] in ((), (1, 1))
        and down.shape[1] == in_dim
        and up.shape[0] == out_dim
        and up.shape[1] == down.shape[0]
    )
    if not ok:
        raise ModelError(
            f"LoRA file {source}: '{w.keys[0]}' has shapes down {tuple(down.shape)} / up {tuple(up.shape)}, "
            f"but layer {name} of this model is {in_dim} -> {out_dim}; the LoRA was probably trained for "
            "another base model (e.g. SD2 or SDXL) — use a LoRA trained for this SD v1.x model"
        )
    # Some exporters write 2-D weights for 1x1 convs (or 4-D for Linears); the numbers are the same.
    rank = down.shape[0]
    if kernel is not None:
        return down.reshape(rank, in_dim, *kernel), up.reshape(out_dim, rank, 1, 1)
    return down.reshape(rank, in_dim), up.reshape(out_dim, rank)


def _unknown_module_error(key: str, source: str, has_te: bool) -> ModelError:
    hint = ""
    if key.startswith(("lora_te1_", "lora_te2_")) or "input_blocks" in key or "output_blocks" in key:
        hint = " (its names are SDXL / original-LDM names)"
    elif key.startswith(LORA_PREFIX_TEXT_ENCODER + "_") and not has_te:
        hint = " (it adapts the text encoder, which this network does not include)"
    elif re.search(r"_(resnets|downsamplers|upsamplers)_\d+_", key):
        return ModelError(
            f"LoRA file {source}: key '{key}' adapts a ResNet block (a conv_dim / LoCon LoRA), which this network "
            "was built without; build it with --network_args conv_dim=R or from the file "
            "(create_network_from_weights)"
        )
    return ModelError(
        f"LoRA file {source}: key '{key}' matches no layer of this SD v1.x model{hint}; the LoRA was "
        "probably trained for another base model — use a LoRA trained for this model"
    )


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadInfo:
    """What :meth:`LoRANetwork.load_weights` did. ``unexpected_keys`` is always empty (loading is strict)."""

    loaded_modules: int
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


class LoRANetwork(nn.Module):
    """A set of :class:`LoRAModule` s for one SD v1.x UNet and (optionally) its CLIP text encoder.

    The modules are registered on the network under their kohya names, so ``network.state_dict()`` has the
    exact keys of a kohya LoRA file.
    """

    def __init__(
        self,
        text_encoder: nn.Module | None,
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        apply_text_encoder: bool = True,
        modules_dim: Mapping[str, int] | None = None,
        modules_alpha: Mapping[str, float | None] | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
    ) -> None:
        super().__init__()
        self.multiplier = float(multiplier)
        self.lora_dim = int(lora_dim)
        self.alpha = float(alpha)
        self.conv_lora_dim = None if conv_lora_dim is None else int(conv_lora_dim)
        self.conv_alpha = None if self.conv_lora_dim is None else float(conv_alpha or 1.0)
        self.dropout = dropout
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for part, model, enabled in (("text_encoder", text_encoder, apply_text_encoder), ("unet", unet, True)):
            if not enabled:
                continue
            with_conv = modules_dim is not None or self.conv_lora_dim is not None
            for name, (path, layer) in find_target_layers(model, part, conv=with_conv).items():
                if modules_dim is not None:
                    if name not in modules_dim:
                        continue  # built from a file: only the layers the file adapts
                    dim, alpha_i = modules_dim[name], (modules_alpha or {}).get(name)
                elif _is_conv3x3(layer):
                    dim, alpha_i = self.conv_lora_dim, self.conv_alpha
                else:
                    dim, alpha_i = self.lora_dim, self.alpha
                lora = LoRAModule(name, part, path, layer, dim, alpha_i, self.multiplier, dropout)
                self.add_module(name, lora)
                (self.unet_loras if part == "unet" else self.text_encoder_loras).append(lora)
        if not self.unet_loras and not self.text_encoder_loras:
            raise ModelError(
                "no LoRA target layers found: the UNet has no Transformer2DModel attention blocks "
                "(down_blocks.*.attentions.*); is this an SD v1.x UNet2DConditionModel?"
            )

    # -- helpers -----------------------------------------------------------------------------------
    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

    def _layers_in(self, text_encoder: nn.Module | None, unet: nn.Module | None) -> dict[str, nn.Module]:
        layers = {n: m for n, (_, m) in find_target_layers(text_encoder, "text_encoder").items()}
        layers.update({n: m for n, (_, m) in find_target_layers(unet, "unet", conv=True).items()})
        return layers

    # -- kohya network-module contract -------------------------------------------------------------
    def apply_to(
        self,
        text_encoder: nn.Module | None,
        unet: nn.Module | None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Patch the adapted layers so the LoRA runs inside the models' own forward passes.

        As in sd-scripts, ``apply_text_encoder=False`` / ``apply_unet=False`` *drops* that part's modules from
        the network (so they are neither trained nor saved). Call :meth:`restore` to undo.
        """
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        layers = self._layers_in(text_encoder if apply_text_encoder else None, unet if apply_unet else None)
        pairs = []
        for lora in self.loras:  # resolve every layer first, so a mismatch patches nothing
            layer = layers.get(lora.lora_name)
            if layer is None:
                what = "text encoder" if lora.part == "text_encoder" else "UNet"
                raise ValueError(f"apply_to: the {what} given has no layer {lora.module_path} for {lora.lora_name}")
            pairs.append((lora, layer))
        done: list[LoRAModule] = []
        try:
            for lora, layer in pairs:
                lora.apply_to(layer)
                done.append(lora)
        except Exception:
            for lora in done:  # all or nothing: never leave the models half patched
                lora.restore()
            raise

    def _drop(self, loras: Iterable[LoRAModule]) -> None:
        for lora in loras:
            lora.restore()
            delattr(self, lora.lora_name)

    def restore(self) -> None:
        """Give every adapted layer its own forward back and detach the LoRA modules from the models."""
        for lora in self.loras:
            lora.restore()

    def set_multiplier(self, multiplier: float) -> None:
        """Strength of the LoRA: 0 is the base model, 1 the trained LoRA."""
        self.multiplier = float(multiplier)
        for lora in self.loras:
            lora.multiplier = self.multiplier

    def is_mergeable(self) -> bool:
        return True

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for lora in self.loras for p in lora.parameters()]

    def prepare_optimizer_params(
        self, text_encoder_lr: float | None, unet_lr: float | None, default_lr: float | None
    ) -> list[dict[str, Any]]:
        """Optimizer param groups: text encoder and UNet, each with its own lr.

        A ``None`` lr falls back to ``default_lr`` (and a group with no lr at all uses the optimizer's
        default); an lr of ``0`` leaves that part out of the optimizer entirely.
        """
        groups: list[dict[str, Any]] = []
        for name, loras, lr in (
            ("text_encoder", self.text_encoder_loras, text_encoder_lr),
            ("unet", self.unet_loras, unet_lr),
        ):
            lr = default_lr if lr is None else lr
            if not loras or lr == 0:
                continue
            group: dict[str, Any] = {"params": [p for lora in loras for p in lora.parameters()], "name": name}
            if lr is not None:
                group["lr"] = float(lr)
            groups.append(group)
        return groups

    def prepare_grad_etc(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None) -> None:
        """Make the LoRA parameters trainable (after the base model was frozen)."""
        for p in self.get_trainable_params():
            p.requires_grad_(True)

    def on_epoch_start(self, text_encoder: nn.Module | None = None, unet: nn.Module | None = None) -> None:
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA runs inside the UNet, whose own checkpointing covers it."""

    # -- weights -----------------------------------------------------------------------------------
    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya-keyed tensors, detached, contiguous, on CPU, cast to ``dtype`` if given."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in self.state_dict().items():
            t = tensor.detach().to("cpu")
            if dtype is not None:
                t = t.to(dtype)
            out[key] = t.contiguous()
        return out

    def default_metadata(self, title: str | None = None) -> dict[str, str]:
        """The metadata every file gets: network shape and ModelSpec identity, nothing about the data."""
        plain = [lora for lora in self.loras if lora.kernel_size in (None, (1, 1))]
        convs = [lora for lora in self.loras if lora.kernel_size not in (None, (1, 1))]
        ranks = Counter(lora.rank for lora in plain)
        alphas = Counter(float(lora.alpha) for lora in plain)
        dim = ranks.most_common(1)[0][0] if ranks else self.lora_dim
        alpha = alphas.most_common(1)[0][0] if alphas else self.alpha
        meta = {
            "ss_network_module": NETWORK_MODULE,
            "ss_network_dim": str(dim),
            "ss_network_alpha": str(float(alpha)),
            "ss_base_model_version": BASE_MODEL_VERSION,
            "ss_v2": "False",
            "modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": MODELSPEC_ARCHITECTURE,
            "modelspec.implementation": "diffusers",
            "modelspec.title": title or "LoRA",
            "modelspec.resolution": "512x512",
            "modelspec.prediction_type": "epsilon",
            "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        }
        network_args: dict[str, Any] = {}
        if convs:  # sd-scripts records its LoCon option the same way (values as strings)
            conv_ranks = Counter(lora.rank for lora in convs)
            conv_alphas = Counter(float(lora.alpha) for lora in convs)
            network_args["conv_dim"] = str(conv_ranks.most_common(1)[0][0])
            network_args["conv_alpha"] = str(conv_alphas.most_common(1)[0][0])
            if len(conv_ranks) > 1 or len(conv_alphas) > 1:
                network_args["variable_rank"] = True
        if len(ranks) > 1 or len(alphas) > 1:
            # Per-layer ranks differ (a file built from weights): record that honestly.
            network_args["variable_rank"] = True
        if network_args:
            meta["ss_network_args"] = json.dumps(network_args)
        if self.dropout:
            meta["ss_network_dropout"] = str(self.dropout)
        return meta

    def save_weights(
        self, file: str | os.PathLike, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write the LoRA as a kohya-format ``.safetensors`` file, atomically.

        ``metadata`` is merged over :meth:`default_metadata`; values must be ``str``. A key that would describe
        the training set (see :data:`FORBIDDEN_METADATA_KEYS`) or a value that is a file path raises ValueError.
        """
        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise ModelError(f"LoRA output {path}: LoRA files are written as safetensors only; use a .safetensors name")
        extra = dict(metadata or {})
        check_metadata(extra)
        tensors = self.lora_state_dict(dtype)
        from safetensors.torch import save, save_file

        meta = self.default_metadata(title=path.stem)
        meta.update(extra)
        # The weights hash is over the tensor bytes only, which do not depend on the header.
        meta["sshs_model_hash"] = _tensor_data_sha256(save(tensors))
        check_metadata(meta)
        with atomic_write_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadInfo:
        """Load a kohya LoRA file (or state dict) into this network's modules.

        Strict on what the file holds: a key for a layer this network does not adapt, or a shape that does not
        fit, raises ModelError naming the file and the key. Modules the file does not mention keep their weights
        and are reported in ``missing_keys``. A file without ``.alpha`` means alpha = rank (as in every loader).
        """
        if isinstance(file, Mapping):
            sd, source, meta = dict(file), _describe(None), {}
        else:
            sd, source = load_lora_state_dict(file), _describe(file)
            meta = read_lora_metadata(file)
        return self._load_grouped(_group_kohya_state_dict(sd, source), source, meta)

    def _load_grouped(self, grouped: dict[str, _ModuleWeights], source: str, meta: dict[str, str]) -> LoadInfo:
        by_name = {lora.lora_name: lora for lora in self.loras}
        for name, w in grouped.items():
            if name not in by_name:
                raise _unknown_module_error(w.keys[0], source, bool(self.text_encoder_loras))
        for name, w in grouped.items():
            lora = by_name[name]
            down, up = _check_shapes(lora.module_path, w, lora.in_dim, lora.out_dim, lora.kernel_size, source)
            if down.shape[0] != lora.rank:
                raise ModelError(
                    f"LoRA file {source}: '{w.keys[0]}' has rank {down.shape[0]} but this network was built with "
                    f"rank {lora.rank}; build the network from the file (create_network_from_weights) instead"
                )
            with torch.no_grad():
                lora.lora_down.weight.copy_(down)
                lora.lora_up.weight.copy_(up)
                lora.set_alpha(lora.rank if w.alpha is None else w.alpha)
        missing = tuple(
            f"{lora.lora_name}{s}" for lora in self.loras if lora.lora_name not in grouped for s in _SUFFIXES
        )
        return LoadInfo(loaded_modules=len(grouped), missing_keys=missing, metadata=meta)

    def merge_to(
        self,
        text_encoder: nn.Module | None,
        unet: nn.Module | None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        multiplier: float = 1.0,
    ) -> None:
        """Fold ``multiplier * alpha / r * up @ down`` into the base weights (for inference).

        ``weights_sd`` (optional) is loaded first. The delta is computed in ``dtype`` (default float32) and added
        in the base weight's own dtype. If this network is applied to those layers it is removed first, so the
        LoRA is not counted twice. Layers of a model passed as ``None`` are left alone.
        """
        if weights_sd is not None:
            self.load_weights(weights_sd)
        compute = dtype or torch.float32
        layers = self._layers_in(text_encoder, unet)
        for lora in self.loras:
            model = text_encoder if lora.part == "text_encoder" else unet
            if model is None:
                continue
            layer = layers.get(lora.lora_name)
            if layer is None:
                raise ValueError(f"merge_to: the model given has no layer {lora.module_path} for {lora.lora_name}")
            if lora.applied and lora._target[0] is layer:
                lora.restore()
            with torch.no_grad():
                delta = lora.delta_weight(compute) * float(multiplier)
                layer.weight.add_(delta.to(device=layer.weight.device, dtype=layer.weight.dtype))


# --------------------------------------------------------------------------------------------------
# metadata policy
# --------------------------------------------------------------------------------------------------


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse metadata that is not ``str -> str`` or that would leak the private training set.

    Raises ValueError naming the key. Refused: the keys in :data:`FORBIDDEN_METADATA_KEYS`, keys containing
    a dataset / caption / path fragment, and values that are absolute file paths.
    """
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"LoRA metadata must map str to str; got {key!r}: {type(value).__name__}")
        low = key.lower()
        if low in FORBIDDEN_METADATA_KEYS or any(f in low for f in _FORBIDDEN_KEY_FRAGMENTS):
            raise ValueError(
                f"LoRA metadata key '{key}' is refused: it would describe the private training set (dataset "
                "folders, captions, tags, image counts or file paths) in a file that is meant to be shared"
            )
        if _PATH_VALUE.match(value):
            raise ValueError(
                f"LoRA metadata key '{key}' is refused: its value looks like a file path, which can reveal "
                "where the private training data lives; store a name, not a path"
            )


# --------------------------------------------------------------------------------------------------
# kohya module-level factories
# --------------------------------------------------------------------------------------------------

_KNOWN_KWARGS = {
    "conv_dim",
    "conv_alpha",
    "train_unet_only",
    "apply_text_encoder",
    "dropout",
    "neuron_dropout",
    "for_inference",
    "weights_sd",
}


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise ConfigError(f"network argument {name} must be true or false, got {value!r}")


def _as_dropout(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"network argument dropout must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"network argument dropout must be in [0, 1), got {p}")
    return p or None


def _as_conv(kwargs: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """``conv_dim`` / ``conv_alpha`` as sd-scripts reads them (alpha defaults to 1, like network_alpha)."""
    raw_dim, raw_alpha = kwargs.get("conv_dim"), kwargs.get("conv_alpha")
    if raw_dim is None or (isinstance(raw_dim, str) and raw_dim.strip().lower() in ("", "none")):
        if raw_alpha is not None:
            raise ConfigError("network argument conv_alpha needs conv_dim (the rank of the 3x3-conv LoRA)")
        return None, None
    try:
        dim = int(raw_dim)
        alpha = 1.0 if raw_alpha is None else float(raw_alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"network arguments conv_dim / conv_alpha must be numbers, got {raw_dim!r} / "
                          f"{raw_alpha!r}") from None
    if dim < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"network argument conv_dim must be a positive integer and conv_alpha positive, got "
                          f"{raw_dim!r} / {raw_alpha!r}")
    return dim, alpha


def _parse_kwargs(kwargs: Mapping[str, Any]) -> tuple[bool, float | None]:
    unknown = sorted(set(kwargs) - _KNOWN_KWARGS)
    if unknown:
        raise ConfigError(
            f"unknown network argument(s) {', '.join(unknown)} for networks.lora; accepted: "
            f"{', '.join(sorted(_KNOWN_KWARGS))} (LyCORIS options are not supported)"
        )
    apply_te = True
    if kwargs.get("train_unet_only") is not None:
        apply_te = not _as_bool("train_unet_only", kwargs["train_unet_only"])
    if kwargs.get("apply_text_encoder") is not None:
        apply_te = apply_te and _as_bool("apply_text_encoder", kwargs["apply_text_encoder"])
    dropout = _as_dropout(kwargs.get("dropout", kwargs.get("neuron_dropout")))
    return apply_te, dropout


def _single_text_encoder(text_encoder: Any) -> nn.Module | None:
    if isinstance(text_encoder, (list, tuple)):
        if len(text_encoder) != 1:
            raise ModelError(
                f"networks.lora is for SD v1.x, which has one text encoder; got {len(text_encoder)} "
                "(is this an SDXL model?)"
            )
        text_encoder = text_encoder[0]
    return text_encoder


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | None,
    unet: nn.Module,
    **kwargs: Any,
) -> LoRANetwork:
    """A fresh LoRA for every Transformer2D Linear / 1x1 conv of ``unet`` and the CLIP attention/MLP layers.

    ``network_dim`` defaults to 4 and ``network_alpha`` to 1.0 (sd-scripts' defaults). ``kwargs``: ``train_unet_only``
    or ``apply_text_encoder`` (bool; no text-encoder LoRA), ``dropout`` / ``neuron_dropout`` (on the rank features,
    training only), ``conv_dim`` / ``conv_alpha`` (also adapt the ResNet blocks and samplers, 3x3 convs at this
    rank). Values may be strings, as ``--network_args`` deliver them. The VAE is not adapted.
    """
    apply_te, dropout = _parse_kwargs(kwargs)
    conv_dim, conv_alpha = _as_conv(kwargs)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"network_dim must be a positive integer, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    text_encoder = _single_text_encoder(text_encoder)
    return LoRANetwork(
        text_encoder if apply_te else None,
        unet,
        multiplier=multiplier,
        lora_dim=dim,
        alpha=alpha,
        dropout=dropout,
        apply_text_encoder=apply_te and text_encoder is not None,
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
    )


def create_network_from_weights(
    multiplier: float,
    file_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | None,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """A network shaped by a kohya LoRA file (per-layer rank from ``lora_down``, alpha from ``.alpha``), loaded.

    Only the layers the file adapts get a module. A key that matches no layer of ``unet`` / ``text_encoder``
    or a tensor of the wrong shape raises ModelError naming the file and the key.
    """
    kwargs = dict(kwargs)
    kwargs.pop("for_inference", None)
    _, dropout = _parse_kwargs(kwargs)
    meta: dict[str, str] = {}
    if weights_sd is not None or isinstance(file_or_state_dict, Mapping):
        sd = dict(weights_sd if weights_sd is not None else file_or_state_dict)  # type: ignore[arg-type]
        source = _describe(None if isinstance(file_or_state_dict, Mapping) else file_or_state_dict)
    elif file_or_state_dict is None:
        raise ValueError("create_network_from_weights needs a file or a state dict")
    else:
        sd, source = load_lora_state_dict(file_or_state_dict), _describe(file_or_state_dict)
        meta = read_lora_metadata(file_or_state_dict)
    text_encoder = _single_text_encoder(text_encoder)
    grouped = _group_kohya_state_dict(sd, source)
    layers = {n: m for n, (_, m) in find_target_layers(text_encoder, "text_encoder").items()}
    layers.update({n: m for n, (_, m) in find_target_layers(unet, "unet", conv=True).items()})
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for name, w in grouped.items():
        layer = layers.get(name)
        if layer is None:
            raise _unknown_module_error(w.keys[0], source, text_encoder is not None)
        down, _ = _check_shapes(name, w, *_layer_dims(layer), source)
        modules_dim[name] = int(down.shape[0])
        modules_alpha[name] = float(down.shape[0]) if w.alpha is None else w.alpha  # no alpha: alpha = rank
    has_te = any(n.startswith(LORA_PREFIX_TEXT_ENCODER + "_") for n in grouped)
    network = LoRANetwork(
        text_encoder if has_te else None,
        unet,
        multiplier=multiplier,
        lora_dim=Counter(modules_dim.values()).most_common(1)[0][0],
        alpha=Counter(modules_alpha.values()).most_common(1)[0][0],
        dropout=dropout,
        apply_text_encoder=has_te,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
    )
    network._load_grouped(grouped, source, meta)
    return network
