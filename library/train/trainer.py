"""The one training loop (accelerate) shared by every method of :mod:`library.train.methods`.

The method-specific parts live in the method; the set-up in :mod:`library.train.setup`; what a run writes in
:mod:`library.train.artifacts`. This module owns the loop: :meth:`Trainer.step` (one iteration of
Algorithm 1, for every method), the epoch bookkeeping, logging and the resumable state.

Randomness is explicit so that ``--save_state`` then ``--resume`` reproduces an uninterrupted run exactly: data
order from :class:`EpochCyclingSampler` (state: two integers), (t, eps) from a ``torch.Generator`` per process,
dropout from torch's global RNG (and the GPU's); every process's streams go into the one state the main one writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from library.data.dataset import shuffle_caption
from library.errors import ConfigError, OutputError, UserError
from library.runtime import cuda_devices, eval_mode, seed_torch
from library.sd.diffusion import (
    NoiseDraw,
    denoising_errors,
    draw_noise,
    per_sample_loss,
)
from library.sd.sampling import read_prompt_file
from library.train import artifacts, divergence, preflight, prior, resume, samples
from library.train.artifacts import TrainResult
from library.train.collectives import Collectives
from library.train.config import TrainConfig
from library.train.config_scope import check_for_method
from library.train.data import (
    LabelledSet,
    TrainingData,
    attach_latents,
    check_training_data,
    load_training_records,
)
from library.train.loss_recorder import LossRecorder, mean_logs
from library.train.methods import (
    ForwardResult,
    MethodSetup,
    SampleSet,
    StepContext,
    TrainingMethod,
    method_class,
)
from library.train.parametrization import build_parametrization, trains_text_encoder
from library.train.rng_state import process_rng_state, restore_process_rng_state
from library.train.run_plan import describe_run, members_sampler_name
from library.train.samplers import EpochCyclingSampler
from library.train.setup import (
    TextConditioner,
    build_optimizer,
    build_scheduler,
    learning_rates,
    load_models,
    make_accelerator,
    total_steps,
)
from library.train.smoothness import SmoothnessTracker, hessian_top_eigenvalue


def _flat_grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0


class Trainer:
    """Set up once, :meth:`prepare`, then :meth:`run` (or call :meth:`step` yourself, as the benchmark does).
    Entry scripts call :func:`train` instead of using this directly."""

    def __init__(self, config: TrainConfig, method_name: str):
        check_for_method(config, method_name)
        self.config = config
        self.method_name = method_name
        self.method_class = method_class(method_name)
        self.output_name = config.output_name or method_name
        self.output_dir = Path(config.output_dir)
        self.accelerator = make_accelerator(config)
        self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
        if self.method_class.single_process and self.world_size > 1:
            raise ConfigError(f"{self.method_class.single_process}; launch train_{method_name}.py without "
                              "--multi_gpu / --num_processes")
        self.device = self.accelerator.device
        self.collectives = Collectives(self.accelerator)
        seed_torch(config.seed, config.full_determinism)  # before the models load and the LoRA is initialised

        if config.sample_prompts:
            read_prompt_file(config.sample_prompts)  # a bad prompt file fails now, not after an epoch
        self.data: TrainingData = load_training_records(config, needs_aux=self.method_class.needs_aux)
        check_training_data(self.data, self.method_class, config, self.world_size)
        prior.check_prior_config(config)
        if config.instance_token:
            prior.check_instance_captions(self.data.members.paths, self.data.members.captions, config.instance_token)
        self.bundle, self.autocast, self.grad_scaler = load_models(config, self.device)
        self.prior_sampler = self._build_prior_sampler() if config.with_prior_preservation else None
        self.trained = build_parametrization(config, self.bundle, self.device,
                                             keep_base=self.method_class.needs_base_model(config))
        self.conditioner = TextConditioner(self.bundle, config, trains_text_encoder=trains_text_encoder(config))

        self.sampler = EpochCyclingSampler(len(self.data.members), config.train_batch_size, config.seed, self.rank,
                                           self.world_size, what=members_sampler_name(self.data.members))
        self.total_steps = total_steps(config, self.sampler)
        self.loss_recorder = LossRecorder(self.sampler.batches_per_epoch // config.gradient_accumulation_steps)
        self.optimizer = build_optimizer(config, self.trained.param_groups(config))
        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)
        # modulo 2**64: any seed up to 2**63 - 1 is valid (torch takes 64 bits); smaller products are unchanged
        self.noise_generator = torch.Generator().manual_seed((config.seed * 7919 + self.rank) % 2**64)
        self.global_step = 0
        self.epoch_logs: list[dict[str, Any]] = []
        self.last_logs: dict[str, float] = {}  # the latest step's, kept in the state: a resume at the end has them
        self.method: TrainingMethod = None  # built in prepare(): the attacker's input size depends on the latents
        self.smoothness = SmoothnessTracker() if config.track_smoothness else None
        self.hessian_generator = torch.Generator().manual_seed(config.seed + 3)

    def _build_prior_sampler(self) -> EpochCyclingSampler | None:
        """DreamBooth's class images (generated by the still unadapted base model where missing) and their sampler.
        Those there already are checked first (captions, decoding, outside the split); a dry run stops there."""
        prior.check_class_images(self.config, self.data.split_roles())  # before minutes of generation
        if self.config.dry_run:
            return None
        preflight.check_output_not_locked(self)  # not minutes of generation for a run its lock would refuse
        records, made = prior.prior_records(self.config, self.bundle, self.collectives.on_main, self.autocast)
        if made and self.accelerator.is_main_process:  # every rank knows the count; it is said once
            print(f"generated {made} class image(s) into {self.config.class_data_dir}", flush=True)
        self.data.prior = LabelledSet([r.path for r in records], [r.caption for r in records])
        return EpochCyclingSampler(len(records), self.config.train_batch_size, self.config.seed + 11, self.rank,
                                   self.world_size, what="the class images (--num_class_images)")

    # ---- set-up that costs compute --------------------------------------------------------------
    def prepare(self) -> None:
        """Encode the latents, build the method (and let it see every set once), then resume if asked."""
        attach_latents(self.data, self.bundle, self.config, self.device, every_set=self.method_class.has_attacker)
        aux = self.data.aux_data()
        self.method = self.method_class.build(MethodSetup(
            self.config, self.device, aux, self.rank, self.world_size,
            network=self.trained.module, params=self.trained.params, num_members=len(self.data.members)))
        sets = [SampleSet(labelled.latents, labelled.captions, labelled.keys) for labelled in self.data.sets()
                if labelled.latents is not None and len(labelled)]
        self.method.before_training(self._context(), sets)
        if self.config.resume:
            artifacts.load_state(self, self.config.resume)

    def plan(self) -> str:
        """The run on one line, printed before anything costly (:func:`library.train.run_plan.describe_run`)."""
        return describe_run(
            self.config, method_name=self.method_name, trained_kind=self.trained.kind,
            trained_parameters=sum(p.numel() for group in self.optimizer.param_groups for p in group["params"]),
            sampler=self.sampler, total_steps=self.total_steps, world_size=self.world_size,
            members=self.data.members, class_images_ready=self.prior_sampler is not None,
            output=self.output_dir / f"{self.output_name}.safetensors")

    def _context(self) -> StepContext:
        return StepContext(
            unet=self.bundle.unet, noise_scheduler=self.bundle.noise_scheduler, encode_text=self.conditioner,
            noise_generator=self.noise_generator, reduce_gradients=self.collectives.reduce_gradients,
            all_reduce_mean=self.collectives.all_reduce_mean, autocast=self.autocast,
            min_timestep=self.config.min_timestep, max_timestep=self.config.max_timestep,
            base_model=self.trained.disabled,
        )

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimisation step, Algorithm 1 lines 4-9 for every method: the attacker's phase (a no-op
        without an attacker, and only every ``attacker_every_n_steps``), the method's loss on a fresh D_tr batch, its
        gradients, the LoRA update; then the step counter advances."""
        cfg = self.config
        ctx = self._context()
        logs: dict[str, float] = {}
        attacker_turn = self.global_step % cfg.attacker_every_n_steps == 0
        if cfg.update_order == "attacker_first" and attacker_turn:
            logs.update(self.method.attacker_phase(ctx))  # Algorithm 1, lines 4-6
        self.optimizer.zero_grad(set_to_none=True)
        hessian_turn = self.smoothness is not None and self.global_step % cfg.hessian_every_n_steps == 0
        micro_logs = []
        for micro_batch in range(cfg.gradient_accumulation_steps):
            hessian_now = hessian_turn and micro_batch == 0
            # A Hessian-vector product differentiates the backward again, which the fused attention kernels do
            # not implement: that forward runs attention through PyTorch's (twice differentiable) math kernel.
            with sdpa_kernel(SDPBackend.MATH) if hessian_now else contextlib.nullcontext():
                result = self._forward(self.sampler.next_indices(), ctx)  # line 7: a fresh D_tr batch
                loss, loss_logs = divergence.checked_loss(self, ctx, result)  # line 8
            if hessian_now:
                hessian = hessian_top_eigenvalue(loss, self.trained.params, generator=self.hessian_generator)
                self.smoothness.add_hessian_norm(self.global_step, hessian)
                logs["hessian_norm"] = hessian
            self.grad_scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            micro_logs.append(loss_logs)
        logs.update(mean_logs(micro_logs))  # the step's losses, not its last micro-batch's
        self.grad_scaler.unscale_(self.optimizer)
        logs.update(self.method.process_gradients(cfg.train_batch_size))  # DP-SGD: clip per sample, add noise
        self.collectives.reduce_gradients(self.trained.params)
        logs["grad_norm"] = _flat_grad_norm(self.trained.params)  # before clipping (paper Fig. 1b)
        divergence.check_gradient_norm(self, logs["grad_norm"])  # NaN weights would be no "last good" LoRA
        if self.smoothness is not None:
            self.smoothness.add_grad_norm(self.global_step, logs["grad_norm"])
        if cfg.grad_normalize and logs["grad_norm"] > 0:  # paper Table 10 baseline
            for p in self.trained.params:
                if p.grad is not None:
                    p.grad.div_(logs["grad_norm"])
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trained.params, cfg.max_grad_norm)
        with divergence.optimizer_overflow(self):
            self.grad_scaler.step(self.optimizer)  # line 9 (skipped by the fp16 scaler on inf/NaN gradients)
        self.grad_scaler.update()
        self.scheduler.step()
        if cfg.update_order == "lora_first" and attacker_turn:  # upstream code order
            logs.update(self.method.attacker_phase(ctx))
        logs.update(learning_rates(self.optimizer, self.scheduler))
        self.global_step += 1  # here, not in run(): whoever takes steps (the loop, a bench) keeps the same schedule
        return logs

    def _forward(self, indices: list[int], ctx: StepContext) -> ForwardResult:
        """The differentiable denoising forward of the D_tr samples ``indices`` on a fresh (t, eps)."""
        members = self.data.members
        latents = members.latents[indices]
        captions = [members.captions[i] for i in indices]
        if self.prior_sampler is not None:  # DreamBooth: the class images ride in the same batched forward
            class_set, class_indices = self.data.prior, self.prior_sampler.next_indices()
            latents = torch.cat([latents, class_set.latents[class_indices]])
            captions += [class_set.captions[i] for i in class_indices]
        if self.config.shuffle_caption:  # seeded by the step, so a resumed run shuffles identically
            rng = random.Random(f"{self.config.seed}-{self.global_step}-{self.rank}")
            captions = [shuffle_caption(c, self.config.keep_tokens, rng) for c in captions]
        draw = draw_noise(latents, self.noise_generator, self.config.min_timestep, self.config.max_timestep)
        with self.autocast():
            conditioning = ctx.encode_text(captions)
            errors = denoising_errors(self.bundle.unet, self.bundle.noise_scheduler, latents, conditioning, draw)
        losses, n, prior_loss = per_sample_loss(errors), len(indices), None
        if len(losses) > n:  # the members are the first n rows; the methods see those only
            prior_loss = self.config.prior_loss_weight * losses[n:].mean()
            errors, losses, latents, conditioning = errors[:n], losses[:n], latents[:n], conditioning[:n]
            draw = NoiseDraw(draw.timesteps[:n], draw.noise[:n])
        return ForwardResult(errors=errors, losses=losses, latents=latents, conditioning=conditioning,
                             keys=[members.keys[i] for i in indices], draw=draw, prior_loss=prior_loss,
                             captions=captions[:n])

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Step until ``total_steps`` (logging, epoch ends, checkpoints on the way), then save the outputs."""
        cfg = self.config
        if self.accelerator.is_main_process and cfg.logging_dir:
            self.accelerator.init_trackers(f"{self.output_name}-{time.strftime('%Y%m%d%H%M%S')}")  # a run each
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=self.method_name, mininterval=1.0,
                   disable=not (cfg.progress_bar and self.accelerator.is_main_process))
        samples.sample_before_training(self)
        logs = self.last_logs
        started, start_step = time.perf_counter(), self.global_step
        images_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * self.world_size
        while self.global_step < self.total_steps:
            epoch_before = self.completed_epochs()
            logs = self.last_logs = self.step()
            kohya_logs = self.loss_recorder.add(logs)
            if log_now := self.global_step % cfg.log_every_n_steps == 0:  # postfix refreshes are not free at 20 it/s
                elapsed = time.perf_counter() - started
                done = self.global_step - start_step
                bar.set_postfix(loss=f"{logs.get('loss', logs.get('l_ada', 0.0)):.4f}",
                                img_s=f"{images_per_step * done / max(elapsed, 1e-9):.1f}", refresh=False)
            bar.update(1)
            if log_now:
                self.accelerator.log({**logs, **kohya_logs}, step=self.global_step)
            for epoch in range(epoch_before + 1, self.completed_epochs() + 1):  # a long accumulation may end two
                self._end_of_epoch(epoch, logs)
            if cfg.save_every_n_steps and self.global_step % cfg.save_every_n_steps == 0 \
                    and self.global_step < self.total_steps:
                artifacts.save_checkpoint(self, "step", self.global_step)
        bar.close()
        if (epoch := samples.partial_epoch_due(self)) is not None:  # sd-scripts samples a cut-short epoch too
            samples.sample_images(self, f"{self.output_name}_e{epoch:06d}")
        if self.smoothness is not None and self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            logs.update({f"smoothness_{k}": v for k, v in self.smoothness.write(
                self.output_dir / self.output_name, title=self.method_name).items()})
        result = artifacts.save_outputs(self, self.output_name, final_logs=logs)
        # Every rank reaches the end before any tears the process group down: a gloo rank that destroys its
        # group while a peer is still writing the run record can abort at exit ("terminate called without an
        # active exception"), failing a run whose outputs are complete.
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return result

    def completed_epochs(self) -> int:
        """Epochs of D_tr completed; the current one counts once what is left of it cannot fill a batch (skipped)."""
        s = self.sampler
        return s.epoch + (1 if s.position + s.global_batch_size > s.num_items else 0)

    def _end_of_epoch(self, epoch: int, logs: dict[str, float]) -> None:
        cfg = self.config
        record: dict[str, Any] = {"epoch": epoch, "step": self.global_step, **logs}
        if self.method.has_attacker and epoch % cfg.attacker_eval_every_n_epochs == 0:
            record.update(self._proxy_monitor(epoch))
        record.update(self.method.end_of_epoch(epoch))
        self.epoch_logs.append(record)
        self.accelerator.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, float)},
                             step=self.global_step)
        self.accelerator.log(self.loss_recorder.end_epoch(), step=epoch)  # sd-scripts' x axis for it: the epoch
        if cfg.sample_prompts and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
            samples.sample_images(self, f"{self.output_name}_e{epoch:06d}")
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and self.global_step < self.total_steps:
            artifacts.save_checkpoint(self, "epoch", epoch)

    def _proxy_monitor(self, epoch: int) -> dict[str, float]:
        """The proxy h_w's accuracy on D_aux and D_te (a monitor only; evaluate_mia.py is the real test).

        Its noise and timesteps come from a generator of its own, seeded by (seed, epoch): drawing them from the
        training stream would make the monitor's cadence change every later training draw, hence the LoRA.
        """
        monitor_generator = torch.Generator().manual_seed((self.config.seed * 104729 + epoch) % 2**64)
        ctx = dataclasses.replace(self._context(), noise_generator=monitor_generator)
        out = {}
        # In eval mode (no LoRA or UNet dropout: a measurement, and one that draws nothing from torch's global
        # RNG); the fork is a second guard, so the monitor can never shift a later dropout mask.
        with torch.random.fork_rng(devices=cuda_devices(self.device)), \
                eval_mode(self.bundle.unet, self.bundle.text_encoder, self.trained.module):
            for split, (members, nonmembers) in {"aux": (self.data.member_aux, self.data.nonmember_aux),
                                                 "test": (self.data.member_test, self.data.nonmember_test)}.items():
                if members is None or nonmembers is None or len(members) + len(nonmembers) == 0:
                    continue
                latents = torch.cat([members.latents, nonmembers.latents])
                labels = torch.tensor([1] * len(members) + [0] * len(nonmembers), dtype=torch.long)
                out[f"proxy_acc_{split}"] = self.method.proxy_accuracy(
                    ctx, latents, members.captions + nonmembers.captions, members.keys + nonmembers.keys, labels)
        return out

    # ---- state ------------------------------------------------------------------------------------
    def ranks_in_sync(self) -> bool:
        """True when every process holds bit-identical LoRA (and attacker) weights."""
        tensors = list(self.trained.params)
        if self.method.has_attacker:
            tensors += [t.float() for t in self.method.attacker.state_dict().values()]
        return self.collectives.in_sync(tensors)

    def state_dict(self, rank_rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Everything ``--resume`` needs to continue bit-exactly; ``rank_rng``: :meth:`gather_rng_states`'s."""
        return {
            "global_step": self.global_step,
            "network": self.trained.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            **({"prior_sampler": self.prior_sampler.state_dict()} if self.prior_sampler is not None else {}),
            "rank_rng": rank_rng,
            "method": self.method.state_dict(),
            "epoch_logs": json.dumps(self.epoch_logs),
            "last_logs": json.dumps(self.last_logs),
            "loss_recorder": json.dumps(self.loss_recorder.state_dict()),
            **({"smoothness": json.dumps(dataclasses.asdict(self.smoothness)),
                "hessian_generator": self.hessian_generator.get_state()} if self.smoothness is not None else {}),
        }

    def gather_rng_states(self) -> list[dict[str, torch.Tensor]]:
        """Every process's random streams, in rank order (a collective: every process calls it)."""
        return self.collectives.gather_objects(process_rng_state(self.noise_generator, self.device))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trained.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.prior_sampler is not None:
            self.prior_sampler.load_state_dict(state["prior_sampler"])
        warning = restore_process_rng_state(state, self.noise_generator, self.device, self.rank, self.world_size)
        if warning and self.accelerator.is_main_process:
            print(warning, flush=True)
        self.method.load_state_dict(state["method"])
        self.global_step = int(state["global_step"])
        self.epoch_logs = json.loads(state["epoch_logs"])
        self.last_logs = json.loads(state.get("last_logs", "{}"))  # older states: none kept
        self.loss_recorder.load_state_dict(json.loads(state.get("loss_recorder", "{}")))  # older states: none kept
        if self.smoothness is not None and "smoothness" in state:  # --track_smoothness: its history goes on
            self.smoothness = SmoothnessTracker(**json.loads(state["smoothness"]))
            self.hessian_generator.set_state(state["hessian_generator"])


def _tell_from_every_process(trainer: Trainer, line: str) -> None:
    """``line`` on stderr from every process, the others' prefixed with their index: when the main process is the
    one killed, the launcher SIGTERMs the others (or they die in gloo's all-reduce), and only they are left to say
    which state to resume from."""
    who = "" if trainer.accelerator.is_main_process else f"process {trainer.accelerator.process_index}: "
    print(who + line, file=sys.stderr, flush=True)


def train(config: TrainConfig, method_name: str) -> TrainResult | None:
    """Train ``method_name`` (a key of ``library.train.methods.METHOD_REGISTRY``) as configured; None for a dry run.

    The output folders are checked first; the run then holds its output folder's lock from before the latents
    are encoded until the last file is written (:mod:`library.train.preflight`)."""
    preflight.check_output_folders(config, create=False)
    trainer = Trainer(config, method_name)
    preflight.check_output_folders(config)  # once model and data are read: a run refused there leaves no folder
    with preflight.run_lock(trainer):
        preflight.check_run(trainer)
        if trainer.accelerator.is_main_process:  # once, under any launcher
            print(trainer.plan(), flush=True)
        if config.dry_run:
            if trainer.accelerator.is_main_process:
                print("dry run: model, data and config are valid; nothing was trained", flush=True)
            return None
        try:
            trainer.prepare()
            result = trainer.run()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: run_cli prints "interrupted"; say what is left to resume
            _tell_from_every_process(trainer, resume.interrupted_hint(trainer))
            raise
        except OutputError as exc:  # a full disk while saving: what is there to resume from
            raise OutputError(f"{exc}; {resume.resume_hint(trainer)}") from None
        except UserError:  # its own one line
            raise
        except Exception:  # a crash, or another rank was killed (gloo's all-reduce fails first): say what is left
            _tell_from_every_process(trainer, f"the run stopped on an error; {resume.resume_hint(trainer)}")
            raise
    if trainer.accelerator.is_main_process:
        what = "LoRA" if trainer.trained.kind == "lora" else "full fine-tune (SD single file; diffusers folders beside it)"
        print(f"saved {what} to {result.weights_path}" + (f" and attacker to {result.attacker_path}"
                                                     if result.attacker_path else ""), flush=True)
    return result


__all__ = ["TrainResult", "Trainer", "train"]
