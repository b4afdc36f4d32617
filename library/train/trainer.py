"""The one training loop (accelerate) shared by plain LoRA, MP-LoRA and SMP-LoRA.

The method-specific parts live in :mod:`library.train.methods`; this module owns everything else: model and
data set-up, the optimiser and schedule, gradient accumulation / clipping / multi-process reduction,
logging, LoRA files, resumable states and the run record.

Randomness is explicit so that ``--save_state`` then ``--resume`` reproduces an uninterrupted run
exactly: data order comes from :class:`EpochCyclingSampler` (state = two integers), (t, eps) from a
dedicated ``torch.Generator`` whose state is saved, and dropout from torch's global RNG (saved too).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from tqdm.auto import tqdm

from library.config import config_to_dict
from library.data.dataset import shuffle_caption
from library.errors import ConfigError, TrainingError
from library.fileio import atomic_write_path, atomic_write_text
from library.runtime import PRECISION_DTYPES, SAVE_DTYPES
from library.sd.diffusion import denoising_errors, draw_noise, per_sample_loss
from library.sd.models import ModelBundle, load_sd_model
from library.sd.sampling import build_pipeline, generate, read_prompt_file, save_grid
from library.sd.text import encode_prompts
from library.train import checkpoint
from library.train.config import TrainConfig
from library.train.data import (
    LabelledSet,
    TrainingData,
    attach_latents,
    load_training_records,
)
from library.train.methods import (
    AdversarialLoRA,
    AuxData,
    ForwardResult,
    StepContext,
    build_method,
)
from library.train.samplers import EpochCyclingSampler
from library.train.smoothness import SmoothnessTracker, hessian_top_eigenvalue
from networks import lora


def _keys(labelled: LabelledSet) -> list[str]:
    """Sample identities (image paths): they seed the proxy's fixed noise and key its base-model cache."""
    return [str(path) for path in labelled.paths]


@dataclass
class TrainResult:
    lora_path: Path
    attacker_path: Path | None
    record_path: Path
    global_step: int
    final_logs: dict[str, float]


class TextConditioner:
    """Caption -> CLIP conditioning; cached per caption when the text encoder is frozen and captions fixed."""

    def __init__(self, bundle: ModelBundle, config: TrainConfig, trains_text_encoder: bool):
        self.bundle = bundle
        self.config = config
        self.trains_text_encoder = trains_text_encoder
        self.cacheable = not trains_text_encoder and not config.shuffle_caption
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self.cacheable:
            missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
            if missing:
                with torch.no_grad():
                    encoded = self._encode(missing)
                self._cache.update(zip(missing, encoded))
            return torch.stack([self._cache[c] for c in captions])
        return self._encode(captions)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        return encode_prompts(self.bundle.tokenizer, self.bundle.text_encoder, captions,
                              max_token_length=self.config.max_token_length, clip_skip=self.config.clip_skip)


def _build_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer_type == "AdamW8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 - optional GPU-box dependency
        except ImportError:
            raise ConfigError("optimizer_type 'AdamW8bit' needs bitsandbytes (pip install bitsandbytes on a "
                              "CUDA machine); use 'AdamW' here") from None
        return bnb.optim.AdamW8bit(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def _build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler  # noqa: PLC0415 - keeps import time down for --help

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=total_steps)


def _flat_grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0


class Trainer:
    """Set up once, then :meth:`run`. Entry scripts call :func:`train` instead of using this directly."""

    def __init__(self, config: TrainConfig, method_name: str):
        config.validate_for_method(method_name)
        self.config = config
        self.method_name = method_name
        self.output_name = config.output_name or method_name
        self.output_dir = Path(config.output_dir)
        self.accelerator = Accelerator(
            # cpu=True on a CPU-only machine lets torchrun / `accelerate launch --multi_gpu` start a gloo
            # process group there (multi-process tests and CPU debugging of the distributed path).
            cpu=not torch.cuda.is_available(),
            log_with="tensorboard" if config.logging_dir else None,
            project_dir=config.logging_dir,
        )
        self.device = self.accelerator.device
        torch.manual_seed(config.seed)

        if config.sample_prompts:
            read_prompt_file(config.sample_prompts)  # a bad prompt file fails now, not after an epoch
        self.data: TrainingData = load_training_records(config, needs_aux=method_name in ("mp_lora", "smp_lora"))
        self.bundle = load_sd_model(config.pretrained_model_name_or_path, tokenizer_path=config.tokenizer_path)
        # Frozen UNet and text encoder in the autocast dtype (memory); the VAE stays fp32 (fp16 SD VAEs
        # overflow to NaN, sd-scripts' --no_half_vae) and so do the LoRA weights, which the optimiser updates.
        weight_dtype = PRECISION_DTYPES[config.mixed_precision]
        # Autocast and loss scaling are ours rather than accelerate's: accelerate keeps one process-wide
        # precision, and several trainers may run in one process (the demo, the benchmark, the tests).
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=weight_dtype,
                                          enabled=config.mixed_precision != "no")
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        for module in (self.bundle.vae, self.bundle.unet, self.bundle.text_encoder):
            module.to(self.device)
        if weight_dtype != torch.float32:
            self.bundle.unet.to(dtype=weight_dtype)
            self.bundle.text_encoder.to(dtype=weight_dtype)

        self.network = lora.create_network(
            1.0, config.network_dim, config.network_alpha, self.bundle.vae, self.bundle.text_encoder,
            self.bundle.unet, dropout=config.network_dropout, **config.network_kwargs,
        )
        train_te = not config.network_train_unet_only and (config.text_encoder_lr is None or config.text_encoder_lr > 0)
        self.network.apply_to(self.bundle.text_encoder, self.bundle.unet, apply_text_encoder=train_te,
                              apply_unet=True)
        if config.network_weights:
            self.network.load_weights(config.network_weights)
        self.network.to(self.device)
        self.trainable = [p for p in self.network.get_trainable_params()]
        for p in self.trainable:
            p.requires_grad_(True)
        if config.gradient_checkpointing:
            self.bundle.unet.enable_gradient_checkpointing()
        self.conditioner = TextConditioner(self.bundle, config, trains_text_encoder=train_te)

        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.sampler = EpochCyclingSampler(len(self.data.members), config.train_batch_size, config.seed, rank, world,
                                           what="D_tr, the members (--train_batch_size)")
        micro_batches_per_step = config.gradient_accumulation_steps
        if config.max_train_epochs is not None:
            self.total_steps = math.ceil(config.max_train_epochs * self.sampler.batches_per_epoch
                                         / micro_batches_per_step)
        else:
            self.total_steps = config.max_train_steps
        param_groups = self.network.prepare_optimizer_params(config.text_encoder_lr, config.unet_lr,
                                                             config.learning_rate)
        self.optimizer = _build_optimizer(config, param_groups)
        self.scheduler = _build_scheduler(config, self.optimizer, self.total_steps)
        self.noise_generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
        self.global_step = 0
        self.epoch_logs: list[dict[str, Any]] = []
        self.method = None  # built after latents exist (the attacker's input size depends on them)
        self.smoothness = SmoothnessTracker() if config.track_smoothness else None
        self.hessian_generator = torch.Generator().manual_seed(config.seed + 3)

    # ---- set-up that costs compute --------------------------------------------------------------
    def prepare(self) -> None:
        attach_latents(self.data, self.bundle, self.config, self.device)
        aux = None
        if self.data.member_aux is not None and len(self.data.member_aux) and len(self.data.nonmember_aux):
            aux = AuxData(self.data.member_aux.latents, self.data.member_aux.captions,
                          self.data.nonmember_aux.latents, self.data.nonmember_aux.captions,
                          _keys(self.data.member_aux), _keys(self.data.nonmember_aux))
        if self.method_name == "dp_lora" and self.accelerator.num_processes > 1:
            raise ConfigError("DP-SGD runs in one process (its per-sample clipping and accountant are per process); "
                              "launch train_dp_lora.py without --multi_gpu / --num_processes")
        self.method = build_method(self.method_name, self.config, aux, self.device,
                                   self.accelerator.process_index, self.accelerator.num_processes,
                                   network=self.network, params=self.trainable, num_members=len(self.data.members))
        if isinstance(self.method, AdversarialLoRA):
            # --attacker_calibration base: the frozen base model's term of every sample the proxy will see
            # (D_tr, D_aux and the monitor's D_te), once. The LoRA is switched off, so this also holds when
            # training continues from --network_weights or a resumed state.
            ctx = self._context()
            for labelled in self.data.sets():
                if labelled.latents is not None and len(labelled):
                    self.method.cache_base_features(ctx, labelled.latents, labelled.captions, _keys(labelled))
        if self.config.resume:
            self._load_state(self.config.resume)

    def plan(self) -> str:
        cfg = self.config
        return (f"method {self.method_name}: {len(self.data.members)} member images, batch "
                f"{cfg.train_batch_size} x {self.accelerator.num_processes} process(es), "
                f"{self.sampler.batches_per_epoch} batches/epoch, {self.total_steps} optimisation steps "
                f"(~{self.total_steps * cfg.gradient_accumulation_steps / max(self.sampler.batches_per_epoch, 1):.1f}"
                f" epochs), output {self.output_dir / (self.output_name + '.safetensors')}")

    def _context(self) -> StepContext:
        return StepContext(
            unet=self.bundle.unet, noise_scheduler=self.bundle.noise_scheduler, encode_text=self.conditioner,
            noise_generator=self.noise_generator, reduce_gradients=self._reduce_gradients,
            all_reduce_mean=self._all_reduce_mean, autocast=self.autocast,
            min_timestep=self.config.min_timestep, max_timestep=self.config.max_timestep,
            base_model=self._base_model,
        )

    @contextlib.contextmanager
    def _base_model(self) -> Iterator[None]:
        """The frozen base model for the block: the LoRA's multiplier at 0, then back."""
        multiplier = self.network.multiplier
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(multiplier)

    def _reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients across processes (the LoRA runs inside the UNet's forward, outside DDP)."""
        self._all_reduce_mean([p.grad for p in params if p.grad is not None])

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean over processes of float tensors, as one flat collective."""
        tensors = [t for t in tensors if t.is_floating_point()]
        if self.accelerator.num_processes == 1 or not tensors:
            return
        flat = self.accelerator.reduce(torch.cat([t.flatten() for t in tensors]), reduction="mean")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    # ---- the loop ---------------------------------------------------------------------------------
    def _forward(self, indices: list[int], ctx: StepContext) -> ForwardResult:
        members = self.data.members
        latents = members.latents[indices]
        captions = [members.captions[i] for i in indices]
        if self.config.shuffle_caption:  # seeded by the step, so a resumed run shuffles identically
            rng = random.Random(f"{self.config.seed}-{self.global_step}-{self.accelerator.process_index}")
            captions = [shuffle_caption(c, self.config.keep_tokens, rng) for c in captions]
        draw = draw_noise(latents, self.noise_generator, self.config.min_timestep, self.config.max_timestep)
        with self.autocast():
            conditioning = ctx.encode_text(captions)
            errors = denoising_errors(self.bundle.unet, self.bundle.noise_scheduler, latents, conditioning, draw)
        return ForwardResult(errors=errors, losses=per_sample_loss(errors), latents=latents,
                             conditioning=conditioning, keys=[str(members.paths[i]) for i in indices])

    def _step(self) -> dict[str, float]:
        cfg = self.config
        ctx = self._context()
        logs: dict[str, float] = {}
        if cfg.update_order == "attacker_first":
            logs.update(self.method.attacker_phase(ctx))  # Algorithm 1, lines 4-6
        self.optimizer.zero_grad(set_to_none=True)
        for micro_batch in range(cfg.gradient_accumulation_steps):
            result = self._forward(self.sampler.next_indices(), ctx)  # line 7: a fresh D_tr batch
            try:
                loss, loss_logs = self.method.lora_loss(ctx, result)  # line 8
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite training loss ({loss_logs}). Lower the learning rate or "
                                        "privacy_lambda, or use mixed_precision bf16/no instead of fp16.")
            except TrainingError as exc:
                self._save_last_good()
                raise TrainingError(f"step {self.global_step}: {exc} The last good LoRA was kept as "
                                    f"{self.output_dir / (self.output_name + '-last-good.safetensors')}.") from None
            if self.smoothness is not None and micro_batch == 0 \
                    and self.global_step % cfg.hessian_every_n_steps == 0:
                hessian = hessian_top_eigenvalue(loss, self.trainable, generator=self.hessian_generator)
                self.smoothness.add_hessian_norm(self.global_step, hessian)
                logs["hessian_norm"] = hessian
            self.grad_scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            logs.update(loss_logs)
        self.grad_scaler.unscale_(self.optimizer)
        logs.update(self.method.process_gradients(cfg.train_batch_size))  # DP-SGD: clip per sample, add noise
        self._reduce_gradients(self.trainable)
        logs["grad_norm"] = _flat_grad_norm(self.trainable)  # before clipping (paper Fig. 1b)
        if self.smoothness is not None:
            self.smoothness.add_grad_norm(self.global_step, logs["grad_norm"])
        if cfg.grad_normalize and logs["grad_norm"] > 0:  # paper Table 10 baseline
            for p in self.trainable:
                if p.grad is not None:
                    p.grad.div_(logs["grad_norm"])
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.grad_scaler.step(self.optimizer)  # line 9 (skipped by the fp16 scaler on inf/NaN gradients)
        self.grad_scaler.update()
        self.scheduler.step()
        if cfg.update_order == "lora_first":  # upstream code order
            logs.update(self.method.attacker_phase(ctx))
        logs["lr"] = self.scheduler.get_last_lr()[0]
        return logs

    def run(self) -> TrainResult:
        cfg = self.config
        if self.accelerator.is_main_process and cfg.logging_dir:
            self.accelerator.init_trackers(self.output_name)
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.method_name, mininterval=1.0,
                   disable=not (cfg.progress_bar and self.accelerator.is_main_process))
        logs: dict[str, float] = {}
        started, start_step = time.perf_counter(), self.global_step
        images_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        while self.global_step < self.total_steps:
            epoch_before = self._completed_epochs()
            logs = self._step()
            self.global_step += 1
            if self.global_step % cfg.log_every_n_steps == 0:  # postfix refreshes are not free at 20 it/s
                elapsed = time.perf_counter() - started
                done = self.global_step - start_step
                bar.set_postfix(loss=f"{logs.get('loss', logs.get('l_ada', 0.0)):.4f}",
                                img_s=f"{images_per_step * done / max(elapsed, 1e-9):.1f}", refresh=False)
            bar.update(1)
            if self.global_step % cfg.log_every_n_steps == 0:
                self.accelerator.log(logs, step=self.global_step)
            epoch = self._completed_epochs()
            if epoch > epoch_before:
                self._end_of_epoch(epoch, logs)
            if cfg.save_every_n_steps and self.global_step % cfg.save_every_n_steps == 0 \
                    and self.global_step < self.total_steps:
                self._save(f"{self.output_name}-step{self.global_step:08d}")
        bar.close()
        if self.smoothness is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            logs.update({f"smoothness_{k}": v for k, v in self.smoothness.write(
                self.output_dir / self.output_name, title=self.method_name).items()})
        result = self._save(self.output_name, final_logs=logs)
        self.accelerator.end_training()
        return result

    def _completed_epochs(self) -> int:
        s = self.sampler
        return s.epoch + (1 if s.position + s.global_batch_size > s.num_items else 0)

    def _end_of_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        cfg = self.config
        record: dict[str, Any] = {"epoch": epoch, "step": self.global_step, **logs}
        if isinstance(self.method, AdversarialLoRA) and epoch % cfg.attacker_eval_every_n_epochs == 0:
            record.update(self._proxy_monitor())
        record.update(self.method.end_of_epoch(epoch))
        self.epoch_logs.append(record)
        self.accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, float)},
                             step=self.global_step)
        if cfg.sample_prompts and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            self._sample_images(f"{self.output_name}_e{epoch:06d}")
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and self.global_step < self.total_steps:
            self._save(f"{self.output_name}-{epoch:06d}")

    def _proxy_monitor(self) -> dict[str, float]:
        """The proxy h_w's accuracy on D_aux and D_te (a monitor only; evaluate_mia.py is the real test)."""
        ctx = self._context()
        out = {}
        for name, (m, nm) in {"aux": (self.data.member_aux, self.data.nonmember_aux),
                              "test": (self.data.member_test, self.data.nonmember_test)}.items():
            if m is None or nm is None or len(m) + len(nm) == 0:
                continue
            latents = torch.cat([m.latents, nm.latents])
            labels = torch.cat([torch.ones(len(m), dtype=torch.long), torch.zeros(len(nm), dtype=torch.long)])
            out[f"proxy_acc_{name}"] = self.method.proxy_accuracy(ctx, latents, m.captions + nm.captions,
                                                                  _keys(m) + _keys(nm), labels)
        return out

    def _sample_images(self, name: str) -> None:
        """Sample the --sample_prompts with the current LoRA into <output_dir>/sample/<name>.png."""
        if not self.accelerator.is_main_process:
            return
        specs = read_prompt_file(self.config.sample_prompts)
        images = generate(build_pipeline(self.bundle), specs, resolution=self.config.resolution,
                          steps=self.config.sample_steps, seed=self.config.seed)
        save_grid(images, self.output_dir / "sample" / f"{name}.png")

    # ---- files ------------------------------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        cfg = self.config
        meta = {
            "ss_output_name": self.output_name,
            "ss_learning_rate": str(cfg.learning_rate),
            "ss_unet_lr": str(cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate),
            "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate),
            "ss_max_train_steps": str(self.total_steps),
            "ss_steps": str(self.global_step),
            "ss_seed": str(cfg.seed),
            "ss_clip_skip": str(cfg.clip_skip),
            "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
            "ss_mixed_precision": cfg.mixed_precision,
            "smp_lora.method": self.method_name,
            "smp_lora.seed": str(cfg.seed),
        }
        if self.data.manifest_sha256:
            meta["smp_lora.manifest_sha256"] = self.data.manifest_sha256
        meta.update(self.method.metadata())
        return meta

    def _save(self, name: str, final_logs: dict[str, float] | None = None) -> TrainResult:
        self.accelerator.wait_for_everyone()
        lora_path = self.output_dir / f"{name}.safetensors"
        attacker_path = None
        record_path = self.output_dir / f"{name}.json"
        if self.accelerator.is_main_process:
            self.network.save_weights(str(lora_path), SAVE_DTYPES[self.config.save_precision], self._metadata())
            if isinstance(self.method, AdversarialLoRA):
                attacker_path = self.output_dir / f"{name}-attacker.safetensors"
                tensors = {k: v.detach().contiguous().cpu() for k, v in self.method.attacker.state_dict().items()}
                with atomic_write_path(attacker_path) as tmp:
                    save_file(tensors, str(tmp), metadata={"smp_lora.method": self.method_name})
        in_sync = self._ranks_in_sync()
        if self.accelerator.is_main_process:
            record = {
                "method": self.method_name, "global_step": self.global_step, "total_steps": self.total_steps,
                "num_processes": self.accelerator.num_processes, "ranks_in_sync": in_sync,
                "manifest_sha256": self.data.manifest_sha256, "config": config_to_dict(self.config),
                "epochs": self.epoch_logs, "final": final_logs or {},
            }
            atomic_write_text(record_path, json.dumps(record, indent=2, default=str))
        if self.config.save_state:
            self._save_state(self.output_dir / f"{name}-state")
        return TrainResult(lora_path, attacker_path, record_path, self.global_step, final_logs or {})

    def _ranks_in_sync(self) -> bool:
        """True when every process holds bit-identical LoRA (and attacker) weights."""
        if self.accelerator.num_processes == 1:
            return True
        tensors = [p.detach().flatten() for p in self.trainable]
        if isinstance(self.method, AdversarialLoRA):
            tensors += [t.detach().flatten().float() for t in self.method.attacker.state_dict().values()]
        flat = torch.cat(tensors).to(torch.float64)
        digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
        gathered = self.accelerator.gather(digest[None].to(self.device)).cpu()
        return bool((gathered == gathered[0]).all())

    def _save_last_good(self) -> None:
        if self.accelerator.is_main_process:
            path = self.output_dir / f"{self.output_name}-last-good.safetensors"
            self.network.save_weights(str(path), SAVE_DTYPES[self.config.save_precision], self._metadata())

    def _state(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "method": self.method.state_dict(),
            "epoch_logs": json.dumps(self.epoch_logs),
        }

    def _save_state(self, directory: Path) -> None:
        if self.accelerator.is_main_process:
            checkpoint.save_state(directory, self._state(), {
                "global_step": self.global_step, "method": self.method_name, "epoch": self._completed_epochs(),
                "config": config_to_dict(self.config),
            })
        self.accelerator.wait_for_everyone()

    def _load_state(self, directory: str) -> None:
        state = checkpoint.load_state(directory)
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_generator.set_state(state["noise_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.method.load_state_dict(state["method"])
        self.global_step = int(state["global_step"])
        self.epoch_logs = json.loads(state["epoch_logs"])


def train(config: TrainConfig, method_name: str) -> TrainResult | None:
    """Train ``method_name`` ('lora', 'mp_lora' or 'smp_lora') as configured; None for a dry run."""
    trainer = Trainer(config, method_name)
    print(trainer.plan(), flush=True)
    if config.dry_run:
        print("dry run: model, data and config are valid; nothing was trained", flush=True)
        return None
    trainer.prepare()
    result = trainer.run()
    if trainer.accelerator.is_main_process:
        print(f"saved LoRA to {result.lora_path}" + (f" and attacker to {result.attacker_path}"
                                                     if result.attacker_path else ""), flush=True)
    return result

