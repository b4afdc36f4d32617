"""Training methods as strategies plugged into the one loop of :mod:`library.trainer`.

* :class:`PlainLoRA` — minimise L_ada (Eq. 3). The baseline.
* :class:`AdversarialLoRA` — the min-max game of Algorithm 1 (SMP-LoRA) / Algorithm 2 (MP-LoRA). The two
  differ only in the objective the LoRA minimises: ``objective="mp"`` is Eq. 6, L_ada + lambda*G;
  ``objective="smp"`` is Eq. 10, L_ada / (1 - lambda*G + delta).

Per training iteration (Algorithm 1):
  lines 4-6  :meth:`attacker_phase` — balanced batches S^m from D^m_aux and S^nm from D^nm_aux, their
             features from the *current* LoRA under ``no_grad`` (the attacker never backpropagates into
             the UNet), ``k_steps`` Adam steps ascending G (Eq. 5).
  lines 7-9  :meth:`lora_loss` — on the fresh D_tr batch, G over its members only (Eq. 6/10) and the
             method's loss. In ``g_noise="reuse"`` mode (default) the attacker reads the error map of the
             very forward that gave L_ada: one differentiable UNet pass instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from library.features import feature_dim, features_from_errors, membership_features
from library.privacy import ProxyAttacker, attacker_loss, mi_gain_members, privacy_loss_terms
from library.samplers import EpochCyclingSampler
from library.train_config import METHODS, TrainConfig


@dataclass
class ForwardResult:
    """The differentiable forward of a D_tr batch (Eq. 1-3)."""

    errors: torch.Tensor  # (B, C, H, W) squared errors, with grad
    losses: torch.Tensor  # (B,) per-sample l_ada
    latents: torch.Tensor
    conditioning: torch.Tensor


@dataclass
class AuxData:
    """Clean latents and captions of the attacker's auxiliary sets D^m_aux and D^nm_aux."""

    member_latents: torch.Tensor
    member_captions: list[str]
    nonmember_latents: torch.Tensor
    nonmember_captions: list[str]


@dataclass
class StepContext:
    """What a method may use from the loop: the patched UNet and how to condition and noise it."""

    unet: torch.nn.Module
    noise_scheduler: Any
    encode_text: Callable[[list[str]], torch.Tensor]
    noise_generator: torch.Generator
    reduce_gradients: Callable[[list[torch.nn.Parameter]], None]
    all_reduce_mean: Callable[[list[torch.Tensor]], None]
    autocast: Callable[[], ContextManager]
    min_timestep: int
    max_timestep: int
    logs: dict[str, float] = field(default_factory=dict)


class PlainLoRA:
    """Plain LoRA: the loop with no privacy term."""

    name = "lora"
    has_attacker = False

    def attacker_phase(self, ctx: StepContext) -> dict[str, float]:
        return {}

    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        l_ada = result.losses.mean()  # Eq. 3
        return l_ada, {"l_ada": l_ada.item()}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def metadata(self) -> dict[str, str]:
        return {}


class AdversarialLoRA:
    """MP-LoRA (Eq. 6) or SMP-LoRA (Eq. 10) with a proxy attacker h_w trained on D_aux (Eq. 5)."""

    has_attacker = True

    def __init__(self, config: TrainConfig, objective: str, aux: AuxData, device: torch.device,
                 rank: int = 0, world_size: int = 1):
        if objective not in ("mp", "smp"):
            raise ValueError(f"objective must be 'mp' or 'smp', got {objective!r}")
        self.name = "mp_lora" if objective == "mp" else "smp_lora"
        self.objective = objective
        self.config = config
        self.aux = aux
        latent_shape = tuple(aux.member_latents.shape[1:])
        in_features = feature_dim(config.attacker_features, latent_shape, config.attacker_timesteps)
        # Seeded separately so that the attacker's initialisation does not depend on the LoRA's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.attacker = ProxyAttacker(
                in_features, dropout=config.attacker_dropout, normalization=config.attacker_normalization,
                # losses at different t differ in scale by orders of magnitude: one mean/var per timestep
                per_feature_stats=config.attacker_features == "multi_t_loss",
            ).to(device)
        self.optimizer = torch.optim.Adam(
            self.attacker.parameters(), lr=config.attacker_lr, weight_decay=config.attacker_weight_decay
        )
        seed = config.seed + 2
        self.member_sampler = EpochCyclingSampler(len(aux.member_captions), config.attacker_batch_size,
                                                  seed, rank, world_size, what="D^m_aux (--attacker_batch_size)")
        self.nonmember_sampler = EpochCyclingSampler(len(aux.nonmember_captions), config.attacker_batch_size,
                                                     seed + 1, rank, world_size,
                                                     what="D^nm_aux (--attacker_batch_size)")

    # ---- Algorithm 1, lines 4-6 --------------------------------------------------------------
    def attacker_phase(self, ctx: StepContext) -> dict[str, float]:
        logs: dict[str, float] = {}
        self.attacker.train()
        for _ in range(self.config.k_steps):
            member_idx = self.member_sampler.next_indices()
            nonmember_idx = self.nonmember_sampler.next_indices()
            latents = torch.cat([self.aux.member_latents[member_idx], self.aux.nonmember_latents[nonmember_idx]])
            captions = [self.aux.member_captions[i] for i in member_idx] + \
                       [self.aux.nonmember_captions[i] for i in nonmember_idx]
            with torch.no_grad():  # the attacker step never backpropagates into the LoRA
                features = self._features(ctx, latents, captions)
            logits = self.attacker(features)
            n_members = len(member_idx)
            loss = attacker_loss(logits[:n_members], logits[n_members:])  # = -G (Eq. 5): ascend G
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ctx.reduce_gradients(list(self.attacker.parameters()))
            self.optimizer.step()
            # Each process saw different noise: average the feature normaliser's running statistics too,
            # so the attacker stays identical on every rank.
            with torch.no_grad():
                ctx.all_reduce_mean(list(self.attacker.buffers()))
            with torch.no_grad():
                predictions = logits.argmax(dim=1)
                labels = torch.cat([torch.ones(n_members), torch.zeros(len(nonmember_idx))]).to(predictions)
                logs = {"attacker_ce": loss.item(), "attacker_acc": (predictions == labels).float().mean().item()}
        return logs

    def _features(self, ctx: StepContext, latents: torch.Tensor, captions: list[str] | None = None,
                  conditioning: torch.Tensor | None = None) -> torch.Tensor:
        """The attacker's features of a batch, from one batched UNet pass under the run's autocast."""
        with ctx.autocast():
            if conditioning is None:
                conditioning = ctx.encode_text(captions)
            return membership_features(
                ctx.unet, ctx.noise_scheduler, latents, conditioning, self.config.attacker_features,
                ctx.noise_generator, timesteps=self.config.attacker_timesteps,
                min_timestep=ctx.min_timestep, max_timestep=ctx.max_timestep,
            ).float()

    # ---- Algorithm 1, lines 7-9 --------------------------------------------------------------
    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        l_ada = result.losses.mean()  # Eq. 3 on the fresh D_tr batch
        reusable = cfg.g_noise == "reuse" and cfg.attacker_features != "multi_t_loss"
        if reusable:
            features = features_from_errors(result.errors, cfg.attacker_features, result.latents.shape[0])
        else:  # upstream: a second, differentiable UNet pass with its own noise
            features = self._features(ctx, result.latents, conditioning=result.conditioning)
        # The attacker is a fixed function here: the LoRA's gradient flows through its input only. Upstream
        # leaves it in train mode (dropout active); we evaluate it deterministically, and eval mode also
        # keeps its normaliser's statistics fitted on balanced attacker batches only.
        self.attacker.eval()
        for param in self.attacker.parameters():
            param.requires_grad_(False)
        try:
            logits = self.attacker(features)
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

    @torch.no_grad()
    def proxy_accuracy(self, ctx: StepContext, latents: torch.Tensor, captions: list[str],
                       labels: torch.Tensor, batch_size: int = 32) -> float:
        """Accuracy of h_w's argmax on a labelled set, one fresh (t, eps) per sample (a monitor only)."""
        self.attacker.eval()
        correct = 0
        for start in range(0, len(captions), batch_size):
            chunk = slice(start, start + batch_size)
            logits = self.attacker(self._features(ctx, latents[chunk], captions[chunk]))
            correct += (logits.argmax(dim=1).cpu() == labels[chunk]).sum().item()
        return correct / max(len(captions), 1)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "attacker": self.attacker.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "member_sampler": self.member_sampler.state_dict(),
            "nonmember_sampler": self.nonmember_sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
            "smp_lora.k_steps": str(cfg.k_steps),
            "smp_lora.update_order": cfg.update_order,
            "smp_lora.g_noise": cfg.g_noise,
        }


def build_method(name: str, config: TrainConfig, aux: AuxData | None, device: torch.device,
                 rank: int = 0, world_size: int = 1) -> PlainLoRA | AdversarialLoRA:
    """The strategy for ``name`` in ``METHODS`` (aux data is required for MP/SMP)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    if name == "lora":
        return PlainLoRA()
    assert aux is not None, "MP/SMP-LoRA need the auxiliary sets"
    return AdversarialLoRA(config, "mp" if name == "mp_lora" else "smp", aux, device, rank, world_size)
