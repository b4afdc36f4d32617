"""MP-LoRA and SMP-LoRA: the min-max game of Algorithm 2 (MP) / Algorithm 1 (SMP) with a proxy attacker h_w.

The two differ only in the objective the LoRA minimises: MP-LoRA's Eq. 6, L_ada + lambda*G, or SMP-LoRA's
Eq. 10, L_ada / (1 - lambda*G + delta). Per training iteration (Algorithm 1):

  lines 4-6  :meth:`AdversarialLoRA.attacker_phase` — balanced batches S^m from D^m_aux and S^nm from
             D^nm_aux, their features from the *current* LoRA under ``no_grad`` (the attacker never
             backpropagates into the UNet), ``k_steps`` Adam steps ascending G (Eq. 5).
  lines 7-9  :meth:`AdversarialLoRA.lora_loss` — on the fresh D_tr batch, G over its members only (Eq. 6/10)
             and the method's loss. In ``g_noise="reuse"`` mode (default) the attacker reads the error map of
             the very forward that gave L_ada: one differentiable UNet pass instead of two.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from library.data.dataset import shuffle_caption
from library.errors import TrainingError, warn
from library.privacy import (
    ProxyAttacker,
    attacker_accuracy,
    attacker_loss,
    mi_gain_members,
    privacy_loss_terms,
)
from library.runtime import cuda_devices
from library.sd.diffusion import NoiseDraw
from library.train.methods.base import (
    AuxData,
    ForwardResult,
    MethodSetup,
    SampleSet,
    StepContext,
    TrainingMethod,
)
from library.train.proxy_features import (
    BaseFeatureCache,
    ProxyFeatures,
    features_from_errors,
)
from library.train.samplers import EpochCyclingSampler

if TYPE_CHECKING:
    from library.train.config import TrainConfig

#: SMP-LoRA warns when the Eq. 10 denominator exceeds this already for an attacker at chance (see check_config).
LARGE_DENOMINATOR = 100.0


class AdversarialLoRA(TrainingMethod):
    """MP-LoRA (Eq. 6) or SMP-LoRA (Eq. 10) with a proxy attacker h_w trained on D_aux (Eq. 5)."""

    objective: ClassVar[str]  # "mp" (Eq. 6) or "smp" (Eq. 10): the subclass decides
    in_paper = True
    needs_aux = True
    has_attacker = True
    step_cost = 3

    @classmethod
    def needs_base_model(cls, config: TrainConfig) -> bool:
        return config.attacker_calibration != "none"  # MP-LoRA's proxy too: a full fine-tune keeps the base

    def __init__(self, config: TrainConfig, aux: AuxData, device: torch.device, rank: int = 0, world_size: int = 1):
        self.config = config
        self.aux = aux
        self.device = device
        self.features = ProxyFeatures(
            kind=config.attacker_features, timesteps=tuple(config.attacker_timesteps), noise=config.attacker_noise,
            calibration=config.attacker_calibration, seed=config.seed, min_timestep=config.min_timestep,
            max_timestep=config.attacker_max_timestep or config.max_timestep)
        self.base_features = BaseFeatureCache()
        self.in_features = self.features.dim(tuple(aux.member_latents.shape[1:]))
        self.restarts = 0
        self._new_attacker(config.seed + 1)
        seed = config.seed + 2
        self.member_sampler = EpochCyclingSampler(len(aux.member_captions), config.attacker_batch_size,
                                                  seed, rank, world_size, what="D^m_aux (--attacker_batch_size)")
        self.nonmember_sampler = EpochCyclingSampler(len(aux.nonmember_captions), config.attacker_batch_size,
                                                     seed + 1, rank, world_size,
                                                     what="D^nm_aux (--attacker_batch_size)")

    @classmethod
    def build(cls, setup: MethodSetup) -> AdversarialLoRA:
        assert setup.aux is not None, "MP/SMP-LoRA need the auxiliary sets"
        return cls(setup.config, setup.aux, setup.device, setup.rank, setup.world_size)

    def _new_attacker(self, seed: int) -> None:
        """A freshly initialised h_w and its optimiser (seeded apart from the LoRA's initialisation)."""
        cfg = self.config
        with torch.random.fork_rng(devices=cuda_devices(self.device)):  # manual_seed reseeds the GPU's RNG too
            torch.manual_seed(seed)
            self.attacker = ProxyAttacker(
                self.in_features, dropout=cfg.attacker_dropout, normalization=cfg.attacker_normalization,
                # losses at different t differ in scale by orders of magnitude, and a raw loss from its
                # calibrated difference: one mean/var per feature
                per_feature_stats=cfg.attacker_features in ("multi_t_loss", "t_loss")
                or self.features.calibration == "both",
            ).to(self.device)
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        """A fresh Adam for h_w: a new attacker, or a ``warm`` restart that keeps the weights but not the moments."""
        self.optimizer = torch.optim.Adam(self.attacker.parameters(), lr=self.config.attacker_lr,
                                          weight_decay=self.config.attacker_weight_decay)

    def end_of_epoch(self, epoch: int) -> dict[str, float]:
        """``--attacker_restart``: every N epochs a new h_w (``reinit``) or a reset of its Adam state (``warm``).

        Why: a proxy that has fallen into a poor optimum (or that the LoRA has learnt to fool) keeps the G
        term near a constant; a fresh attacker re-measures what the LoRA leaks now.
        """
        cfg = self.config
        if cfg.attacker_restart == "none" or epoch % cfg.attacker_restart_every_n_epochs:
            return {}
        self.restarts += 1
        if cfg.attacker_restart == "reinit":
            self._new_attacker(cfg.seed + 1 + 1000 * self.restarts)
        else:
            self._new_optimizer()
        return {"attacker_restarts": float(self.restarts)}

    def before_training(self, ctx: StepContext, sets: Sequence[SampleSet]) -> None:
        """``--attacker_calibration base`` (or ``both``) with fixed noise: the frozen base model's term of every sample
        the proxy will see (D_tr, D_aux and the monitor's D_te), once. The LoRA is switched off, so this also
        holds when training continues from --network_weights or a resumed state."""
        for samples in sets:
            self.cache_base_features(ctx, samples.latents, samples.captions, samples.keys)

    def cache_base_features(self, ctx: StepContext, latents: torch.Tensor, captions: list[str],
                            keys: list[str]) -> None:
        """The base model's features of these samples, once (only for base calibration with fixed noise)."""
        if not self.features.caches_base:
            return
        if ctx.base_model is None:
            raise ValueError("base-calibrated features need the step context's base_model switch")
        index = {key: i for i, key in enumerate(keys)}

        def compute(chunk: list[str]) -> torch.Tensor:
            rows = [index[k] for k in chunk]
            return self._raw_features(ctx, latents[rows], chunk, [captions[i] for i in rows])

        self.base_features.fill(keys, compute, ctx.base_model, batch_size=max(1, 64 // len(self.features.timesteps)))

    # ---- Algorithm 1, lines 4-6 --------------------------------------------------------------
    def attacker_phase(self, ctx: StepContext) -> dict[str, float]:
        """``k_steps`` updates of h_w on fresh balanced D_aux batches; logs their mean cross-entropy and accuracy."""
        ce_sum = accuracy_sum = 0.0
        self.attacker.train()
        for _ in range(self.config.k_steps):
            # Where D^m_aux's sampler stands names this batch: the caption shuffle's seed (not a (t, eps) NoiseDraw)
            batch_epoch, batch_position = self.member_sampler.epoch, self.member_sampler.position
            member_idx = self.member_sampler.next_indices()
            nonmember_idx = self.nonmember_sampler.next_indices()
            latents = torch.cat([self.aux.member_latents[member_idx], self.aux.nonmember_latents[nonmember_idx]])
            captions = [self.aux.member_captions[i] for i in member_idx] + \
                       [self.aux.nonmember_captions[i] for i in nonmember_idx]
            if self.config.shuffle_caption:  # as D_tr's are (and upstream's aux samples, from the same dataset)
                rng = random.Random(f"{self.config.seed}-aux-{batch_epoch}-{batch_position}-{self.member_sampler.rank}")
                captions = [shuffle_caption(c, self.config.keep_tokens, rng) for c in captions]
            keys = [self.aux.member_keys[i] for i in member_idx] + [self.aux.nonmember_keys[i] for i in nonmember_idx]
            with torch.no_grad():  # the attacker step never backpropagates into the LoRA
                features = self._features(ctx, latents, keys, captions)
            logits = self.attacker(features)
            n_members = len(member_idx)
            loss = attacker_loss(logits[:n_members], logits[n_members:])  # = -G (Eq. 5): ascend G
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.reduce_gradients(list(self.attacker.parameters()))
            try:
                self.optimizer.step()
            except RuntimeError as exc:  # float32 overflow inside AdamW (see divergence.optimizer_overflow)
                if "overflow" not in str(exc):
                    raise
                raise TrainingError(f"the proxy attacker's optimizer step overflowed float32 ({exc}): attacker_lr "
                                    f"{self.config.attacker_lr} cannot train; lower attacker_lr") from None
            # Each process saw different noise: average the feature normaliser's running statistics too,
            # so the attacker stays identical on every rank.
            with torch.no_grad():
                ctx.all_reduce_mean(list(self.attacker.buffers()))
            ce_sum += loss.item()
            accuracy_sum += attacker_accuracy(logits[:n_members].detach(), logits[n_members:].detach())
        return {"attacker_ce": ce_sum / self.config.k_steps, "attacker_acc": accuracy_sum / self.config.k_steps}

    def _raw_features(self, ctx: StepContext, latents: torch.Tensor, keys: list[str] | None,
                      captions: list[str] | None = None, conditioning: torch.Tensor | None = None,
                      draw: NoiseDraw | None = None) -> torch.Tensor:
        """Uncalibrated features of a batch, from one batched UNet pass under the run's autocast."""
        with ctx.autocast():
            if conditioning is None:
                assert captions is not None
                conditioning = ctx.encode_text(captions)
            return self.features.raw(ctx.unet, ctx.noise_scheduler, latents, conditioning, keys,
                                     ctx.noise_generator, draw).float()

    def _features(self, ctx: StepContext, latents: torch.Tensor, keys: list[str] | None,
                  captions: list[str] | None = None, conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """What h_w sees: the raw features, minus the base model's on the same (t, eps) when calibrated."""
        if not self.features.uses_base:
            return self._raw_features(ctx, latents, keys, captions, conditioning)
        if self.features.caches_base:
            assert keys is not None
            features = self._raw_features(ctx, latents, keys, captions, conditioning)
            return self.features.calibrate(features, self.base_features.lookup(keys, features.device))
        # Fresh noise: one draw for both passes; the base pass is a constant for the LoRA's gradient. The base
        # model is the whole of it: its own text encoder too, so captions are re-encoded when they are known.
        assert ctx.base_model is not None, "base-calibrated features need the step context's base_model switch"
        draw = self.features.draw(latents, keys, ctx.noise_generator)
        features = self._raw_features(ctx, latents, keys, captions, conditioning, draw)
        with ctx.base_model(), torch.no_grad():
            base = self._raw_features(ctx, latents, keys, captions, None if captions else conditioning, draw)
        return self.features.calibrate(features, base)

    # ---- Algorithm 1, lines 7-9 --------------------------------------------------------------
    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        l_ada = result.adaptation_loss()  # Eq. 3 on the fresh D_tr batch
        if cfg.g_noise == "reuse" and self.features.reuses_training_forward:
            features = self._training_features(ctx, result)
            if features is None:  # no row of this batch in the proxy's t band: no privacy term this step
                terms = privacy_loss_terms(self.objective, l_ada, l_ada.new_zeros(()), cfg.privacy_lambda,
                                           cfg.privacy_delta)
                return terms.loss, {"l_ada": l_ada.item(), "g": 0.0, "loss": terms.loss.item()}
        else:  # upstream (and fixed / multi-t features): a second, differentiable UNet pass
            features = self._features(ctx, result.latents, result.keys, result.captions, result.conditioning)
        # The attacker is a fixed function here: the LoRA's gradient flows through its input only. Upstream
        # leaves it in train mode (dropout active, --g_attacker_dropout); by default we evaluate it
        # deterministically. Either way its normaliser's statistics stay fitted on balanced attacker batches only.
        self.attacker.train(cfg.g_attacker_dropout)
        for param in self.attacker.parameters():
            param.requires_grad_(False)
        try:
            logits = self.attacker(features, update_stats=False)
        finally:
            for param in self.attacker.parameters():
                param.requires_grad_(True)
        g = mi_gain_members(logits, member_weight=cfg.g_member_weight)  # G(h_w, D_tr, f), members only
        # Eq. 6 (MP-LoRA) or Eq. 10 (SMP-LoRA)
        terms = privacy_loss_terms(self.objective, l_ada, g, cfg.privacy_lambda, cfg.privacy_delta)
        logs = {"l_ada": l_ada.item(), "g": g.item(), "loss": terms.loss.item()}
        if terms.denominator is not None:
            logs["denominator"] = float(terms.denominator)
        return terms.loss, logs

    def _training_features(self, ctx: StepContext, result: ForwardResult) -> torch.Tensor | None:
        """G's input read from L_ada's own forward. ``t_loss`` with ``--attacker_max_timestep`` keeps only the rows
        whose t falls in the proxy's band (None when none does); base calibration adds one no-grad base pass on
        those rows' very (t, eps)."""
        errors, latents, conditioning, keys, captions, draw = (result.errors, result.latents, result.conditioning,
                                                                result.keys, result.captions, result.draw)
        if self.features.kind == "t_loss" and draw is not None:
            rows = draw.timesteps < self.features.max_timestep
            if not bool(rows.any()):
                return None
            if not bool(rows.all()):
                errors, latents, conditioning = errors[rows], latents[rows], conditioning[rows]
                draw = NoiseDraw(draw.timesteps[rows], draw.noise[rows])
                kept = rows.tolist()
                keys = [key for key, k in zip(keys, kept) if k] if keys is not None else None
                captions = [caption for caption, k in zip(captions, kept) if k] if captions is not None else None
        features = features_from_errors(errors, self.config.attacker_features, latents.shape[0],
                                        draw.timesteps if draw is not None else None)
        if self.features.uses_base:  # t_loss: the base model on the very same (t, eps)
            base = self._base_on_draw(ctx, latents, keys, captions, conditioning, draw)
            features = self.features.calibrate(features, base)
        return features

    @torch.no_grad()
    def _base_on_draw(self, ctx: StepContext, latents: torch.Tensor, keys: list[str] | None,
                      captions: list[str] | None, conditioning: torch.Tensor, draw: NoiseDraw | None) -> torch.Tensor:
        """The frozen base model's features of L_ada's rows on L_ada's own (t, eps): one no-grad pass, with the base
        text encoder's encoding of the captions (as the attacker phase's base term has), where they are known."""
        assert ctx.base_model is not None, "base-calibrated features need the step context's base_model switch"
        with ctx.base_model():
            return self._raw_features(ctx, latents, keys, captions,
                                      conditioning=None if captions else conditioning.detach(), draw=draw)

    @torch.no_grad()
    def proxy_accuracy(self, ctx: StepContext, latents: torch.Tensor, captions: list[str], keys: list[str],
                       labels: torch.Tensor, batch_size: int = 32) -> float:
        """Accuracy of h_w's argmax on a labelled set, with the training features (a monitor only)."""
        self.attacker.eval()
        correct = 0
        for start in range(0, len(captions), batch_size):
            chunk = slice(start, start + batch_size)
            logits = self.attacker(self._features(ctx, latents[chunk], keys[chunk], captions[chunk]))
            correct += (logits.argmax(dim=1).cpu() == labels[chunk]).sum().item()
        return correct / max(len(captions), 1)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "attacker": self.attacker.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "member_sampler": self.member_sampler.state_dict(),
            "nonmember_sampler": self.nonmember_sampler.state_dict(),
            "restarts": self.restarts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restarts = int(state.get("restarts", 0))
        self.attacker.load_state_dict(state["attacker"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.member_sampler.load_state_dict(state["member_sampler"])
        self.nonmember_sampler.load_state_dict(state["nonmember_sampler"])

    def metadata(self) -> dict[str, str]:
        cfg = self.config
        return {
            "smp_lora.privacy_lambda": str(cfg.privacy_lambda),
            "smp_lora.privacy_delta": str(cfg.privacy_delta),
            "smp_lora.attacker_features": cfg.attacker_features,
            "smp_lora.attacker_timesteps": ",".join(map(str, cfg.attacker_timesteps)),
            "smp_lora.attacker_noise": cfg.attacker_noise,
            "smp_lora.attacker_calibration": cfg.attacker_calibration,
            "smp_lora.attacker_lr": str(cfg.attacker_lr),
            "smp_lora.attacker_batch_size": str(cfg.attacker_batch_size),
            "smp_lora.attacker_restart": f"{cfg.attacker_restart}/{cfg.attacker_restart_every_n_epochs}",
            "smp_lora.k_steps": str(cfg.k_steps),
            "smp_lora.attacker_every_n_steps": str(cfg.attacker_every_n_steps),
            "smp_lora.update_order": cfg.update_order,
            "smp_lora.g_noise": cfg.g_noise,
            **({"smp_lora.g_attacker_dropout": "true"} if cfg.g_attacker_dropout else {}),
        }


class MPLoRA(AdversarialLoRA):
    """MP-LoRA (Algorithm 2): minimise Eq. 6, L_ada + lambda*G."""

    name = "mp_lora"
    objective = "mp"
    base_config = "mp_lora"


class SMPLoRA(AdversarialLoRA):
    """SMP-LoRA (Algorithm 1): minimise Eq. 10, L_ada / (1 - lambda*G + delta)."""

    name = "smp_lora"
    objective = "smp"
    base_config = "smp_lora"

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Warn (one ``warning:`` line, the run goes on) when lambda (or delta) makes Eq. 10 all but stop the LoRA.

        G <= 0 and it falls as the LoRA hides its members, so the denominator 1 - lambda*G + delta is smallest
        for an attacker at chance, G = g_member_weight * log(1/2), where training starts. If it exceeds
        :data:`LARGE_DENOMINATOR` even there, every LoRA gradient is scaled down at least that much throughout:
        with the paper's lambda 0.05 it is ~1.03; lambda 1e9 gives ~7e8 and a LoRA that barely moves.
        A warning, not an error: a huge lambda is a legitimate end point of a privacy-utility sweep.
        """
        g_at_chance = config.g_member_weight * math.log(2.0)  # -G
        at_chance = 1.0 + config.privacy_lambda * g_at_chance + config.privacy_delta
        if g_at_chance > 0 and at_chance > LARGE_DENOMINATOR:
            room = LARGE_DENOMINATOR - 1 - config.privacy_delta  # delta is part of the denominator too
            cause, advice = ((f"privacy_lambda {config.privacy_lambda}",
                              f"lambda below {room / g_at_chance:.0f} keeps it under {LARGE_DENOMINATOR:.0f}")
                             if room > 0 else  # no lambda helps: name what does
                             (f"privacy_delta {config.privacy_delta}",
                              f"delta alone puts it past {LARGE_DENOMINATOR:.0f}: lower it (the paper's is 1e-5)"))
            warn(f"{cause} makes the Eq. 10 denominator {at_chance:.3g} already for an attacker at chance, so the "
                 f"LoRA gradient shrinks by that factor and the LoRA will barely train; {advice}")
