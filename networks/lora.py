"""A kohya-compatible LoRA network for Stable Diffusion v1.x (diffusers UNet + transformers CLIP).

The public names follow sd-scripts' ``networks.lora`` (``create_network``, ``create_network_from_weights``,
``LoRANetwork.apply_to`` / ``prepare_optimizer_params`` / ``save_weights`` / ``load_weights`` / ``merge_to``)
so sd-scripts users feel at home, and the files it writes are plain kohya LoRA files (keys, shapes and
metadata in :mod:`networks.lora_format`) that diffusers' ``load_lora_weights``, ComfyUI and AUTOMATIC1111
load as they are. With ``--network_args conv_dim=R [conv_alpha=A]`` (sd-scripts' "LoCon" option) the ResNet
blocks and down/up-samplers are adapted too: 3x3 convs at rank ``conv_dim``, their Linear / 1x1 layers
(``time_emb_proj``, ``conv_shortcut``) at ``network_dim``, exactly as sd-scripts does.

The parts: :mod:`networks.lora_modules` (the LoRA layer), :mod:`networks.lora_targets` (which layers are
adapted), :mod:`networks.lora_args` (``--network_args``), :mod:`networks.lora_format` (the file, its metadata
privacy policy and hashes). This module assembles them and re-exports their public names.

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

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from library.errors import ConfigError, ModelError
from networks.lora_args import (
    parse_conv_args,
    parse_network_kwargs,
    single_text_encoder,
)
from networks.lora_convert import group_lora_state_dict
from networks.lora_format import (
    BASE_MODEL_VERSION,
    FORBIDDEN_METADATA_KEYS,
    KOHYA_SUFFIXES,
    LORA_PREFIX_TEXT_ENCODER,
    LORA_PREFIX_UNET,
    MODELSPEC_ARCHITECTURE,
    MODELSPEC_VERSION,
    NETWORK_MODULE,
    ModuleWeights,
    check_metadata,
    check_shapes,
    default_metadata,
    describe_source,
    load_lora_state_dict,
    lora_file_sha256,
    ranks_and_alphas,
    read_lora_metadata,
    read_lora_source,
    unknown_module_error,
    write_lora_file,
)
from networks.lora_io import LoraSource
from networks.lora_modules import LORA_CHILD_NAME, LoRAModule
from networks.lora_targets import find_target_layers, is_conv3x3, layers_by_name

__all__ = [
    "BASE_MODEL_VERSION",
    "FORBIDDEN_METADATA_KEYS",
    "LORA_CHILD_NAME",
    "LORA_PREFIX_TEXT_ENCODER",
    "LORA_PREFIX_UNET",
    "MODELSPEC_ARCHITECTURE",
    "MODELSPEC_VERSION",
    "NETWORK_MODULE",
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
        with_conv = modules_dim is not None or self.conv_lora_dim is not None
        for part, model, enabled in (("text_encoder", text_encoder, apply_text_encoder), ("unet", unet, True)):
            if not enabled:
                continue
            for name, (path, layer) in find_target_layers(model, part, conv=with_conv).items():
                if modules_dim is not None:
                    if name not in modules_dim:
                        continue  # built from a file: only the layers the file adapts
                    dim, alpha_i = modules_dim[name], (modules_alpha or {}).get(name)
                elif is_conv3x3(layer):
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
        layers = layers_by_name(text_encoder if apply_text_encoder else None, unet if apply_unet else None)
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

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model for the block: the multiplier at 0, then back to what it was (even on an exception).

        With the multiplier at 0 every :class:`LoRAModule` returns its layer's own output untouched.
        """
        multiplier = self.multiplier
        self.set_multiplier(0.0)
        try:
            yield
        finally:
            self.set_multiplier(multiplier)

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
        return default_metadata(self.loras, self.lora_dim, self.alpha, self.dropout, title)

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
        meta = self.default_metadata(title=path.stem)
        meta.update(extra)
        write_lora_file(path, tensors, meta)

    def load_weights(self, file: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadInfo:
        """Load a kohya LoRA file (or state dict) into this network's modules.

        Strict on what the file holds: a key for a layer this network does not adapt, or a shape that does not
        fit, raises ModelError naming the file and the key. Modules the file does not mention keep their weights
        and are reported in ``missing_keys``. A file without ``.alpha`` means alpha = rank (as in every loader).
        """
        sd, source, meta = read_lora_source(file)  # diffusers/PEFT keys are read as kohya ones (lora_convert)
        return self._load_grouped(group_lora_state_dict(sd, source, meta), source, meta)

    def _load_grouped(self, grouped: dict[str, ModuleWeights], source: str, meta: dict[str, str]) -> LoadInfo:
        by_name = {lora.lora_name: lora for lora in self.loras}
        for name, w in grouped.items():
            if name not in by_name:
                raise unknown_module_error(w.keys[0], source, bool(self.text_encoder_loras))
        for name, w in grouped.items():
            lora = by_name[name]
            down, up = check_shapes(lora.module_path, w, lora.in_dim, lora.out_dim, lora.kernel_size, source)
            if down.shape[0] != lora.rank:
                key = next((k for k in w.keys if k.endswith(".lora_down.weight")), w.keys[0])
                flag = "--network_dim " if lora.kernel_size in (None, (1, 1)) else "--network_args conv_dim="
                raise ModelError(
                    f"LoRA file {source}: '{key}' has rank {down.shape[0]} but this network was built with rank "
                    f"{lora.rank}; continue it with {flag}{down.shape[0]}, or with --dim_from_weights, which "
                    "builds the network from the file's own ranks and alphas (also when they differ by layer)"
                )
            with torch.no_grad():
                lora.lora_down.weight.copy_(down)
                lora.lora_up.weight.copy_(up)
                lora.set_alpha(lora.rank if w.alpha is None else w.alpha)
        missing = tuple(
            f"{lora.lora_name}{s}" for lora in self.loras if lora.lora_name not in grouped for s in KOHYA_SUFFIXES
        )
        return LoadInfo(loaded_modules=len(grouped), missing_keys=missing, metadata=meta)

    def merge_to(
        self,
        text_encoder: nn.Module | None,
        unet: nn.Module | None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        multiplier: float | None = None,
    ) -> None:
        """Fold ``multiplier * alpha / r * up @ down`` into the base weights (for inference); sd-scripts' signature.

        ``weights_sd`` (optional) is loaded first. The delta is computed in ``dtype`` (default float32) on ``device``
        (default: the LoRA's) and added in the base weight's own dtype; ``multiplier`` defaults to the network's own,
        as in the patched forward. If this network is applied to those layers it is removed first, so the LoRA is
        not counted twice. Layers of a model passed as ``None`` are left alone.
        """
        if weights_sd is not None:
            self.load_weights(weights_sd)
        compute, strength = dtype or torch.float32, self.multiplier if multiplier is None else float(multiplier)
        layers = layers_by_name(text_encoder, unet)
        for lora in self.loras:
            model = text_encoder if lora.part == "text_encoder" else unet
            if model is None:
                continue
            layer = layers.get(lora.lora_name)
            if layer is None:
                raise ValueError(f"merge_to: the model given has no layer {lora.module_path} for {lora.lora_name}")
            if lora.is_applied_to(layer):
                lora.restore()
            with torch.no_grad():
                delta = lora.delta_weight(compute, device) * strength
                layer.weight.add_(delta.to(device=layer.weight.device, dtype=layer.weight.dtype))


# --------------------------------------------------------------------------------------------------
# kohya module-level factories
# --------------------------------------------------------------------------------------------------


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
    apply_te, dropout = parse_network_kwargs(kwargs)
    conv_dim, conv_alpha = parse_conv_args(kwargs)
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise ConfigError(f"network_dim must be a positive integer, got {network_dim}")
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    text_encoder = single_text_encoder(text_encoder)
    return LoRANetwork(text_encoder if apply_te else None, unet, multiplier=multiplier, lora_dim=dim, alpha=alpha,
                       dropout=dropout, apply_text_encoder=apply_te and text_encoder is not None,
                       conv_lora_dim=conv_dim, conv_alpha=conv_alpha)


def create_network_from_weights(
    multiplier: float,
    file_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor] | LoraSource | None,
    vae: nn.Module | None,
    text_encoder: nn.Module | None,
    unet: nn.Module,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """(a network shaped by a kohya LoRA file (per-layer rank from ``lora_down``, alpha from ``.alpha``), loaded;
    the file's tensors), as sd-scripts returns them (``network, weights_sd = create_network_from_weights(...)``).

    Only the layers the file adapts get a module. A key that matches no layer of ``unet`` / ``text_encoder``
    or a tensor of the wrong shape raises ModelError naming the file and the key. A LoraSource is not read again.
    """
    kwargs = dict(kwargs)
    kwargs.pop("for_inference", None)
    _, dropout = parse_network_kwargs(kwargs)
    if weights_sd is not None:  # sd-scripts' in-memory weights win; a file argument only names them in errors
        sd, meta = dict(weights_sd), {}
        source = describe_source(None if isinstance(file_or_state_dict, Mapping) else file_or_state_dict)
    elif file_or_state_dict is None:
        raise ValueError("create_network_from_weights needs a file or a state dict")
    else:
        sd, source, meta = read_lora_source(file_or_state_dict)
    text_encoder = single_text_encoder(text_encoder)
    layers = layers_by_name(text_encoder, unet)
    grouped = group_lora_state_dict(sd, source, meta, layers)  # kohya, diffusers or PEFT keys (lora_convert)
    modules_dim, modules_alpha = ranks_and_alphas(grouped, layers, source, text_encoder is not None)
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
    return network, sd
