"""Membership features: what the proxy attacker h_w sees (the f(x) of the paper's Eq. 5).

The paper feeds h_w "the adaptation loss" of a sample; the upstream code feeds the full per-element
squared-error map of one random (t, eps). :class:`ProxyFeatures` offers those and the stronger views an
adversary would really use (``docs/paper-fidelity.md``, "What h_w sees"; ``docs/results.md`` §6), chosen by three flags:

``--attacker_features`` (what is measured)
  * ``error_map``    — the flattened (eps_hat - eps)^2 map at one t, C*H*W features (upstream).
  * ``loss``         — the per-sample loss of Eq. 1 at one t (one feature).
  * ``multi_t_loss`` — the per-sample losses at the fixed ``--attacker_timesteps`` (K features): membership
    lives at small t (per-t AUC ~0.99 for t <= 200 on the demo, 0.67 at t = 700), which one random t
    mostly misses.
  * ``t_loss``       — the loss at one random t *and that t* (two features, t / 1000 and the loss): a
    timestep-aware proxy at the cost of one t per sample, which reads G from L_ada's own forward
    (``--g_noise reuse``) even when base-calibrated: the holding variant's signal at a fraction of multi_t_loss's
    passes (issue 17).

``--attacker_noise`` (which (t, eps))
  * ``fresh`` — a new draw from the run's noise generator on every call (the paper / upstream).
  * ``fixed`` — one draw per (sample, t), seeded by the sample's identity (the manifest's sha256 of the image,
    so a moved dataset trains the same) and t: the same sample always gets the same noise (and, for the one-t
    kinds, the same t), as the evaluation attacks do.
    Paired draws take the noise variance out of the comparison between members and non-members.

``--attacker_calibration`` (relative to what)
  * ``none`` — the raw value.
  * ``base`` — the value under the LoRA minus the value under the frozen base model for the same (t, eps):
    the reference-calibrated signal of the strongest evaluation attack (it removes how hard each image is
    for the base model). With fixed noise the base term is a constant per (sample, t): it is computed once,
    before training, and cached (:class:`BaseFeatureCache`). With fresh noise it costs one more no-grad UNet
    pass (the LoRA switched off) on the same draw each time. Calibrated features can be negative: use a
    normalisation without ``log``.
  * ``both`` — the raw value and the calibrated one side by side (``t_loss``: t, loss, loss minus base), at the
    cost of ``base``. Why: a proxy that reads only the calibrated loss defends that statistic, and the raw loss
    above its band stays the defence's most consistent leak (``docs/results.md`` §25). Measured: it does not close
    that leak (§26), so the defaults keep ``base``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from library.errors import ConfigError
from library.runtime import hashed_seed
from library.sd.diffusion import (
    NoiseDraw,
    denoising_errors,
    draw_noise,
    fixed_timestep_noise,
    per_sample_loss,
)

FEATURE_KINDS = ("error_map", "loss", "multi_t_loss", "t_loss")
NOISE_MODES = ("fresh", "fixed")
CALIBRATIONS = ("none", "base", "both")


def feature_dim(kind: str, latent_shape: Sequence[int], timesteps: Sequence[int]) -> int:
    """Input size of the attacker for ``kind`` and a latent of shape (C, H, W)."""
    if kind == "error_map":
        channels, height, width = latent_shape
        return int(channels * height * width)
    if kind == "loss":
        return 1
    if kind == "multi_t_loss":
        return len(timesteps)
    if kind == "t_loss":
        return 2
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def features_from_errors(errors: torch.Tensor, kind: str, batch_size: int,
                         timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Turn error maps from :func:`denoising_errors` into a (B, F) feature matrix (``t_loss`` needs the rows'
    ``timesteps``)."""
    if kind == "error_map":
        return errors.flatten(1)
    losses = per_sample_loss(errors)
    if kind == "loss":
        return losses[:, None]
    if kind == "t_loss":
        if timesteps is None:
            raise ValueError("t_loss features need the timesteps of the rows")
        return torch.stack([timesteps.to(losses) / 1000.0, losses], dim=1)
    if kind == "multi_t_loss":
        return losses.view(batch_size, -1)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def key_seed(seed: int, key: str, slot: str) -> int:
    """A 63-bit generator seed for one (sample key, slot); independent of batch composition and order."""
    return hashed_seed("smp-lora-proxy-noise", seed, key, slot)


def fixed_draw(keys: Sequence[str], timesteps: Sequence[int] | None, latent_shape: Sequence[int], seed: int,
               min_timestep: int = 0, max_timestep: int = 1000) -> NoiseDraw:
    """The fixed (t, eps) of each key: at every t of ``timesteps`` (rows sample-major, B*K), or, when
    ``timesteps`` is None, at one t per key drawn from [min_timestep, max_timestep) by the key's own seed."""
    ts: list[int] = []
    noise: list[torch.Tensor] = []
    for key in keys:
        if timesteps is None:
            g = torch.Generator().manual_seed(key_seed(seed, key, "t"))
            slots = [("random", int(torch.randint(min_timestep, max_timestep, (1,), generator=g)))]
        else:
            slots = [(f"t{t}", int(t)) for t in timesteps]
        for slot, t in slots:
            g = torch.Generator().manual_seed(key_seed(seed, key, slot))
            ts.append(t)
            noise.append(torch.randn(tuple(latent_shape), generator=g, dtype=torch.float32))
    return NoiseDraw(torch.tensor(ts, dtype=torch.long), torch.stack(noise))


@dataclass(frozen=True)
class ProxyFeatures:
    """The proxy's feature function; see the module docstring for the three choices."""

    kind: str = "error_map"
    timesteps: tuple[int, ...] = (50, 100, 200, 350)
    noise: str = "fresh"
    calibration: str = "none"
    seed: int = 0
    min_timestep: int = 0
    max_timestep: int = 1000

    def __post_init__(self) -> None:
        for name, value, allowed in (("attacker_features", self.kind, FEATURE_KINDS),
                                     ("attacker_noise", self.noise, NOISE_MODES),
                                     ("attacker_calibration", self.calibration, CALIBRATIONS)):
            if value not in allowed:
                raise ConfigError(f"'{name}' must be one of {', '.join(allowed)}, got {value!r}")
        if self.uses_base and self.kind == "error_map":
            raise ConfigError(f"'attacker_calibration = {self.calibration}' works on losses: use attacker_features "
                              "t_loss, loss or multi_t_loss")

    @property
    def uses_base(self) -> bool:
        """Whether the features need the frozen base model's term (``base`` or ``both``)."""
        return self.calibration != "none"

    def dim(self, latent_shape: Sequence[int]) -> int:
        raw = feature_dim(self.kind, latent_shape, self.timesteps)
        if self.calibration != "both":
            return raw
        return raw + (1 if self.kind == "t_loss" else raw)  # t_loss: t once, then the raw and calibrated losses

    @property
    def reuses_training_forward(self) -> bool:
        """Whether the G term may read the error map of L_ada's own forward (one random fresh t per sample); with
        base calibration only for ``t_loss``, whose base term is one no-grad pass on that same draw."""
        one_t = self.kind != "multi_t_loss" and self.noise == "fresh"
        return one_t and (self.calibration == "none" or self.kind == "t_loss")

    def calibrate(self, features: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """``features`` minus the base model's on the same (t, eps), ``t_loss`` keeping its t column; with ``both``
        the raw columns come first, the calibrated ones after them."""
        if self.kind == "t_loss":
            t, loss = features[:, 0], features[:, 1]
            columns = [t, loss, loss - base[:, 1]] if self.calibration == "both" else [t, loss - base[:, 1]]
            return torch.stack(columns, dim=1)
        if self.calibration == "both":
            return torch.cat([features, features - base], dim=1)
        return features - base

    @property
    def caches_base(self) -> bool:
        """Whether the base model's term is a per-sample constant, computed once (fixed noise)."""
        return self.uses_base and self.noise == "fixed"

    def draw(self, latents: torch.Tensor, keys: Sequence[str] | None, generator: torch.Generator | None) -> NoiseDraw:
        """The (t, eps) of a batch: B rows, or B*K for ``multi_t_loss``."""
        timesteps = list(self.timesteps) if self.kind == "multi_t_loss" else None
        if self.noise == "fixed":
            if keys is None or len(keys) != latents.shape[0]:
                raise ValueError("fixed proxy noise needs one key per sample")
            draw = fixed_draw(keys, timesteps, latents.shape[1:], self.seed, self.min_timestep, self.max_timestep)
            return NoiseDraw(draw.timesteps.to(latents.device), draw.noise.to(latents.device, latents.dtype))
        if timesteps is not None:
            return fixed_timestep_noise(latents, timesteps, generator)
        return draw_noise(latents, generator, self.min_timestep, self.max_timestep)

    def raw(self, unet: torch.nn.Module, noise_scheduler, latents: torch.Tensor, conditioning: torch.Tensor,
            keys: Sequence[str] | None, generator: torch.Generator | None, draw: NoiseDraw | None = None,
            ) -> torch.Tensor:
        """Uncalibrated features (B, F) from one batched UNet pass (differentiable if the caller allows), on
        ``draw`` when given (the same (t, eps) for the LoRA and the base model), else on :meth:`draw`'s."""
        draw = draw if draw is not None else self.draw(latents, keys, generator)
        errors = denoising_errors(unet, noise_scheduler, latents, conditioning, draw)
        return features_from_errors(errors, self.kind, latents.shape[0], draw.timesteps)


class BaseFeatureCache:
    """The base model's features per sample key (calibration ``base`` / ``both``): computed once, then looked up."""

    def __init__(self) -> None:
        self._values: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._values)

    def fill(self, keys: Sequence[str], compute: Callable[[list[str]], torch.Tensor],
             base_model: Callable[[], ContextManager], batch_size: int = 16) -> None:
        """Compute the missing keys' base features with ``compute(keys) -> (B, F)`` inside ``base_model()``."""
        missing = list(dict.fromkeys(k for k in keys if k not in self._values))
        with base_model(), torch.no_grad():
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                values = compute(chunk).detach().float().cpu()
                self._values.update(zip(chunk, values))

    def lookup(self, keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        try:
            return torch.stack([self._values[k] for k in keys]).to(device)
        except KeyError as exc:
            raise KeyError(f"no base-model features cached for sample {exc.args[0]!r}") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._values)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._values = dict(state)


__all__ = ["BaseFeatureCache", "CALIBRATIONS", "FEATURE_KINDS", "NOISE_MODES", "ProxyFeatures", "feature_dim",
           "features_from_errors", "fixed_draw", "key_seed"]
