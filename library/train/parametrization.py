"""What a run trains, chosen independently of the objective (:mod:`library.train.methods`).

``--train_mode lora`` (the default) trains a LoRA / LoCon adapter patched into the frozen UNet (and text encoder):
:class:`LoRAParametrization`, kohya's network module. ``--train_mode full`` trains the UNet's own weights, and the
text encoder's with ``--train_text_encoder``: :class:`FullParametrization`, the paper's "full fine-tuning" and
DreamBooth rows (Table 9). Every objective (plain, MP, SMP, RelaxLoss; DP-SGD for adapters only) runs on either
through the same loop: the loop sees only the parameters, their optimiser groups, a switch to the frozen base model
and how to save and resume.

A full fine-tune is written as an SD single-file checkpoint ``<name>.safetensors`` (LDM layout, what AUTOMATIC1111
and ComfyUI load) and a diffusers UNet folder ``<name>-unet/`` (``UNet2DConditionModel.from_pretrained``), plus
``<name>-text_encoder/`` when the text encoder was trained; safetensors only, each with the LoRA files' metadata
policy (training settings, never the data: :func:`networks.lora_format.check_metadata`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any, ContextManager, Iterator, Mapping

import torch

from library.data.lineage import lineage_metadata
from library.errors import ConfigError, ModelError, TrainingError, warn
from library.fileio import (
    remove_dir,
    replace_dir,
    storage_errors_named,
    temporary_dir,
    write_safetensors,
)
from library.sd.bundle import ModelBundle
from library.sd.configs import diffusers_config, text_encoder_config
from library.sd.single_file import save_single_file
from library.train.config import TrainConfig
from networks import lora
from networks.lora_format import check_metadata
from networks.lora_io import read_lora_source


def trains_text_encoder(config: TrainConfig) -> bool:
    """Whether the run updates the text encoder (its LoRA, or its own weights in full fine-tuning): asked for, and at
    a rate above 0 (``text_encoder_lr``, else ``learning_rate``; a part at rate 0 is left out of the optimiser)."""
    asked = config.train_text_encoder if config.train_mode == "full" else not config.network_train_unet_only
    return asked and config.effective_text_encoder_lr > 0


def _trainable(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    for p in params:
        p.requires_grad_(True)
    return params


class Parametrization:
    """The trained parameters of a run and everything the loop does with them."""

    kind = "parametrization"
    module: torch.nn.Module  # what per-sample-gradient hooks wrap (DP-SGD)
    params: list[torch.nn.Parameter]  # the trained parameters, requires_grad set
    parent_metadata: dict[str, str] | None = None  # the metadata of the LoRA this run continues (--network_weights)
    # What the saved files record of the splits the starting weights saw (library.data.lineage): the parent's, or
    # on a resume the state's (replaced, never mutated)
    lineage: Mapping[str, str] = MappingProxyType({})

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        """Optimiser groups with their learning rates (a rate of 0 leaves that part out)."""
        raise NotImplementedError

    def disabled(self) -> ContextManager[None]:
        """The frozen base model for the block (what base-calibrated features compare with)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def save(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        """Write the trained weights as ``<output_dir>/<name>.safetensors`` (and siblings); returns that file."""
        raise NotImplementedError

    def remove(self, output_dir: Path, name: str) -> None:
        """Delete what :meth:`save` wrote under ``name`` (an intermediate checkpoint past its retention)."""
        (output_dir / f"{name}.safetensors").unlink(missing_ok=True)


class LoRAParametrization(Parametrization):
    """A kohya LoRA / LoCon network (``networks.lora``) patched into the frozen models."""

    kind = "lora"

    def __init__(self, network: lora.LoRANetwork, parent_metadata: dict[str, str] | None = None):
        self.network = network
        self.parent_metadata = parent_metadata
        self.lineage = lineage_metadata(parent_metadata)
        self.module = network
        self.params = _trainable(network.get_trainable_params())

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        return self.network.prepare_optimizer_params(config.text_encoder_lr, config.unet_lr, config.learning_rate)

    def disabled(self) -> ContextManager[None]:
        return self.network.disabled()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(state)

    def save(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        path = output_dir / f"{name}.safetensors"
        self.network.save_weights(str(path), dtype, metadata)
        return path


class FullParametrization(Parametrization):
    """The UNet's own weights (and the text encoder's with ``--train_text_encoder``), in fp32 master copies.

    The frozen base model (``keep_base``, for base-calibrated proxy features) is a copy of the initial weights that
    :meth:`disabled` swaps in for a no-grad block: twice the UNet's memory, so it is kept only when the objective
    asks for it (:meth:`library.train.methods.TrainingMethod.needs_base_model`).
    """

    kind = "full"

    def __init__(self, bundle: ModelBundle, train_text_encoder: bool, keep_base: bool):
        self.bundle = bundle
        self.parts: dict[str, torch.nn.Module] = {"unet": bundle.unet}
        if train_text_encoder:
            self.parts["text_encoder"] = bundle.text_encoder
        self.module = bundle.unet
        self.params = _trainable([p for part in self.parts.values() for p in part.parameters()])
        self._base = [p.detach().clone() for p in self.params] if keep_base else None

    def param_groups(self, config: TrainConfig) -> list[dict[str, Any]]:
        rates = {"unet": config.effective_unet_lr, "text_encoder": config.effective_text_encoder_lr}
        return [{"params": list(part.parameters()), "lr": rates[name], "name": name}
                for name, part in self.parts.items() if rates[name] > 0]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        if self._base is None:
            raise TrainingError("the base model was not kept for this run (FullParametrization(keep_base=False))")
        base = self._base
        with torch.no_grad():
            for i, p in enumerate(self.params):  # swap storages: no copy, and the same tensors come back
                p.data, base[i] = base[i], p.data
            try:
                yield
            finally:
                for i, p in enumerate(self.params):
                    p.data, base[i] = base[i], p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value.detach().cpu().clone()
                for name, part in self.parts.items() for key, value in part.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self.parts.items():
            prefix = f"{name}."
            part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def save(self, output_dir: Path, name: str, dtype: torch.dtype, metadata: dict[str, str]) -> Path:
        """``<name>.safetensors`` (SD single file), ``<name>-unet/`` (and ``<name>-text_encoder/``), atomically."""
        meta = {**metadata, "smp_lora.train_mode": "full",  # evaluate_mia reads the text encoder only if trained
                "smp_lora.trained_text_encoder": str("text_encoder" in self.parts).lower()}
        check_metadata(meta)  # the LoRA files' policy: settings only, nothing that names the data
        path = save_single_file(self.bundle, output_dir / f"{name}.safetensors", dtype=dtype, metadata=meta)
        for part_name, part in self.parts.items():
            weights = "diffusion_pytorch_model.safetensors" if part_name == "unet" else "model.safetensors"
            _save_model_folder(output_dir / f"{name}-{part_name}", part, _folder_config(part_name, part), weights,
                               dtype, meta)
        if "text_encoder" not in self.parts:  # an overwritten run's trained text encoder must not pose as this one's
            _remove_our_folder(output_dir / f"{name}-text_encoder", "model.safetensors")
        return path

    def remove(self, output_dir: Path, name: str) -> None:
        # the single file last: it is what retention finds a checkpoint by, so a killed prune is finished later
        _remove_our_folder(output_dir / f"{name}-unet", "diffusion_pytorch_model.safetensors")
        _remove_our_folder(output_dir / f"{name}-text_encoder", "model.safetensors")
        super().remove(output_dir, name)


def _remove_our_folder(folder: Path, weights: str) -> None:
    """Delete ``folder`` if a full fine-tune of this toolkit wrote it (its weights say so); anything else stays."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(folder / weights), framework="pt") as handle:
            ours = (handle.metadata() or {}).get("smp_lora.train_mode") == "full"
    except Exception:  # missing or unreadable (safetensors' own error type): not ours to delete
        return
    if ours:
        remove_dir(folder)  # whole or not at all: a half folder would no longer show whose it is


def _folder_config(part_name: str, part: torch.nn.Module) -> dict[str, Any]:
    """``config.json`` of a saved part, with the class keys diffusers' / transformers' ``AutoModel`` read."""
    if part_name == "unet":
        import diffusers

        return {"_class_name": type(part).__name__, "_diffusers_version": diffusers.__version__,
                **diffusers_config(part)}
    return {"model_type": getattr(part.config, "model_type", "clip_text_model"),
            "architectures": [type(part).__name__], **text_encoder_config(part)}


def _save_model_folder(target: Path, model: torch.nn.Module, config: dict[str, Any], weights: str,
                       dtype: torch.dtype, metadata: dict[str, str]) -> None:
    """A diffusers / transformers model folder (``config.json`` + one safetensors file), built aside, moved in."""
    staging = temporary_dir(target)
    try:
        with storage_errors_named(target):
            (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
            tensors = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
                       for k, v in model.state_dict().items()}
            write_safetensors(staging / weights, tensors, {"format": "pt", **metadata})
            replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _warn_if_alpha_differs(config: TrainConfig, parent: dict[str, str]) -> None:
    """A continued LoRA keeps its file's alphas (as in sd-scripts: they are part of its weights); a different
    ``--network_alpha`` is said to be unused, since the run's config would otherwise name a scale it never had."""
    try:
        alpha = float(parent.get("ss_network_alpha", ""))
    except ValueError:
        return  # a file without the record: its alphas are loaded all the same
    if alpha != float(config.network_alpha):
        warn(f"--network_alpha {config.network_alpha:g} is not used: the LoRA continued from {config.network_weights} "
             f"keeps its own alpha {alpha:g} (as sd-scripts does; the saved LoRA records it); pass --network_alpha "
             f"{alpha:g} so that the run's config says so too")


def _lora_network(config: TrainConfig, bundle: ModelBundle) -> tuple[lora.LoRANetwork, dict[str, str] | None]:
    """(the LoRA network to train, the metadata of the LoRA it continues or None). ``--dim_from_weights`` shapes it
    by the ``--network_weights`` file (sd-scripts' flag: per-layer ranks and alphas), else the flags do."""
    if config.dim_from_weights:
        assert config.network_weights  # TrainConfig refuses dim_from_weights without it
        text_encoder = bundle.text_encoder if trains_text_encoder(config) else None
        parent = read_lora_source(config.network_weights)  # read once: the network's weights and the lineage
        network, _ = lora.create_network_from_weights(1.0, parent, bundle.vae, text_encoder, bundle.unet,
                                                      dropout=config.network_dropout)
        return network, parent.metadata
    network = lora.create_network(
        1.0, config.network_dim, config.network_alpha, bundle.vae, bundle.text_encoder, bundle.unet,
        dropout=config.network_dropout, **config.network_kwargs,
    )
    parent = None
    if config.network_weights:  # its metadata: what its weights have seen (library.data.lineage)
        loaded = network.load_weights(config.network_weights)
        parent = loaded.metadata
        _check_nothing_dropped(config, network, loaded.missing_keys)
        _warn_if_alpha_differs(config, parent)
    return network, parent


def _check_nothing_dropped(config: TrainConfig, network: lora.LoRANetwork, missing_keys: tuple[str, ...]) -> None:
    """A continued LoRA's text-encoder part would be dropped in silence by a run that trains none (apply_to leaves
    those modules out): refused, as --dim_from_weights refuses it."""
    if trains_text_encoder(config):
        return
    missing = {key.split(".")[0] for key in missing_keys}
    if loaded := [m.lora_name for m in network.text_encoder_loras if m.lora_name not in missing]:
        raise ModelError(
            f"LoRA file {config.network_weights} has a text-encoder part ({loaded[0]}, ...), which this run would "
            "drop: it trains no text-encoder LoRA (--network_train_unet_only, or a text-encoder rate of 0). To "
            "continue the file, train the text encoder too (--no-network_train_unet_only, with --text_encoder_lr), "
            "or continue a copy of it without its lora_te_* tensors")


def build_parametrization(config: TrainConfig, bundle: ModelBundle, device: torch.device,
                          keep_base: bool) -> Parametrization:
    """What ``config.train_mode`` trains, on ``device``, with gradient checkpointing when asked."""
    if config.train_mode == "full":
        trained: Parametrization = FullParametrization(bundle, trains_text_encoder(config), keep_base)
    else:
        network, parent = _lora_network(config, bundle)
        network.apply_to(bundle.text_encoder, bundle.unet, apply_text_encoder=trains_text_encoder(config),
                         apply_unet=True)
        network.to(device)
        trained = LoRAParametrization(network, parent)
    groups = trained.param_groups(config)
    if not groups:
        raise ConfigError("nothing to train: every learning rate of the trained parts is 0 (check unet_lr, "
                          "text_encoder_lr and learning_rate)")
    # A part at rate 0 is frozen, not trained at rate 0: the optimiser never zeroes its gradients, which would pile
    # up step after step, count in the gradient norm and shrink the other part's updates under clipping.
    optimized = {id(param) for group in groups for param in group["params"]}
    for param in trained.params:
        param.requires_grad_(id(param) in optimized)
    trained.params = [param for param in trained.params if id(param) in optimized]
    if config.gradient_checkpointing:
        bundle.unet.enable_gradient_checkpointing()
    return trained
