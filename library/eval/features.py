"""The feature engine of the MIA suite: per-sample UNet noise-prediction errors, with paired noise, cached.

For every sample of the split manifest and every model (the base model and each LoRA) it computes

* ``losses`` ``[N, K, M]``: the per-sample loss of Eq. 1 at each of the K fixed ``timesteps`` and M noise draws;
* ``paper`` ``[N, D, F]`` (optional): what the paper's h' sees, the squared-error map (F = C*H*W) or the scalar
  loss (F = 1) at a random timestep per sample, as the upstream attacker does; D = ``paper_draws`` independent
  (t, eps) draws per sample (1, the default, is upstream's single query).

**Paired noise.** The noise of query (sample, slot, draw) comes from its own ``torch.Generator`` seeded by a
hash of (seed, the image's sha256, slot, draw), where the slot is the timestep value (or ``paper`` for the
random-t query, whose t is drawn from the same generator). Every model therefore sees *exactly* the same
(t, eps) for a sample: differences between models are not noise (common random numbers, which is what makes
the reference-calibrated attack sharp), the base model evaluated twice gives identical features, and the
noise of a sample does not depend on batch composition, sample order or which other timesteps are asked.

**Caching.** Features are stored as safetensors under ``cache_dir`` keyed by the base model's fingerprint, the
LoRA file's (or fully fine-tuned UNet's) weights sha256, the manifest's sha256 and every feature setting, so
re-running a report (another attack, more bootstrap resamples) costs no UNet pass. An unreadable or mismatching
cache file is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from library.data.images import IMAGE_CONVERSION
from library.eval.probes import (
    ModelContext,
    Probe,
    ProbeCache,
    cached_probe_runs,
    compute_probes,
)
from library.eval.unet_weights import (
    UNetWeights,
    load_text_encoder_state_dict,
    load_unet_state_dict,
    swapped_weights,
)
from library.fileio import write_safetensors
from library.runtime import hashed_seed, kernel_signature
from library.sd.diffusion import NoiseDraw, denoising_errors, per_sample_loss
from library.sd.text import encode_prompts

if TYPE_CHECKING:
    from networks.lora_io import LoraSource

FEATURE_FORMAT = "smp-lora-mia-features-v2"  # v2: the paper features are [N, D, F]
PAPER_ROW_KINDS = ("error_map", "loss")  # paper feature kinds that need their own random-t query


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that changes the features' values (all of it goes into the cache key)."""

    timesteps: tuple[int, ...]
    num_noise_draws: int
    seed: int
    paper_features: str | None = None  # None: no paper query; "multi_t_loss" reuses ``losses``
    paper_min_timestep: int = 0
    paper_max_timestep: int = 1000
    paper_draws: int = 1  # independent random-t queries per sample for the paper's features
    resolution: int = 512
    clip_skip: int = 1
    max_token_length: int | None = None
    multiplier: float = 1.0
    dtype: str = "float32"
    full_determinism: bool = False  # --full_determinism: other GPU kernels, so (on a GPU) other bits
    latent_mode: str = "mean"  # --latent_mode: z_0 is the VAE posterior's mean, or one seeded draw of it

    @property
    def paper_row(self) -> bool:
        """Whether each sample gets extra random-t queries (``paper_draws`` of them) for the paper's features."""
        return self.paper_features in PAPER_ROW_KINDS

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        if not self.full_determinism:  # the default kernels' keys (features and probes) stay what they always were
            del data["full_determinism"]
        if self.latent_mode == "mean":  # likewise the default latents'
            del data["latent_mode"]
        return data

    def value_dict(self) -> dict[str, Any]:
        """:meth:`as_dict` with the paper's query settings reset when there is no paper query: the features of
        ``paper_features="multi_t_loss"`` (it reuses the fixed-t losses) are those of no paper attack at all, so
        adding the paper's h' to a finished evaluation finds its losses in the cache."""
        if self.paper_row:
            return self.as_dict()
        defaults = {name: f.default for name, f in self.__dataclass_fields__.items() if name.startswith("paper_")}
        return replace(self, **defaults).as_dict()


@dataclass(frozen=True)
class Sample:
    """One image to attack: its path, caption and content hash (the hash seeds its noise)."""

    path: Path
    caption: str
    sha256: str


@dataclass
class ModelFeatures:
    """Features of one model on every sample (rows in the order of the samples given)."""

    name: str
    losses: torch.Tensor  # [N, K, M] float32
    paper: torch.Tensor | None  # [N, D, F] float32
    paper_timesteps: torch.Tensor | None  # [N, D] long, the random t of each sample's paper queries
    cache_key: str = ""
    cache_hit: bool = False
    probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # {probe: {output: [N, ...]}}
    probe_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # {probe: cost and cache record}


@dataclass(frozen=True)
class Query:
    sample: int
    timestep: int
    noise_seed: int
    slot: int  # index into the K*M loss slots, or -1-d for the paper query of draw d


def noise_seed(seed: int, sample_sha256: str, slot: str, draw: int) -> int:
    """A 63-bit generator seed for one (sample, slot, draw); independent of model, order and batching."""
    return hashed_seed("smp-lora-mia-noise", seed, sample_sha256, slot, draw)


def paper_timestep(settings: FeatureSettings, sample_sha256: str, draw: int = 0) -> tuple[int, int]:
    """(t, noise seed) of a sample's paper query number ``draw``: t ~ U{min, ..., max-1} from a seed of its own."""
    generator = torch.Generator().manual_seed(noise_seed(settings.seed, sample_sha256, "paper_t", draw))
    t = int(torch.randint(settings.paper_min_timestep, settings.paper_max_timestep, (1,), generator=generator))
    return t, noise_seed(settings.seed, sample_sha256, "paper", draw)


def plan_queries(samples: Sequence[Sample], settings: FeatureSettings) -> list[Query]:
    """Every UNet query, sample-major: K*M fixed-t queries per sample, then its paper queries (if any)."""
    queries: list[Query] = []
    m_draws = settings.num_noise_draws
    for i, sample in enumerate(samples):
        for k, t in enumerate(settings.timesteps):
            for m in range(m_draws):
                queries.append(Query(i, int(t), noise_seed(settings.seed, sample.sha256, f"t{t}", m), k * m_draws + m))
        if settings.paper_row:
            for d in range(settings.paper_draws):
                t, seed = paper_timestep(settings, sample.sha256, d)
                queries.append(Query(i, t, seed, -1 - d))
    return queries


def query_noise(query: Query, shape: Sequence[int]) -> torch.Tensor:
    """The Gaussian noise of ``query`` (CPU, fp32), from its own generator."""
    generator = torch.Generator().manual_seed(query.noise_seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def feature_cache_key(
    settings: FeatureSettings, base_fingerprint: str, lora_sha256: str | None, manifest_sha256: str, n_samples: int,
    unet_sha256: str | None = None, *, kernels: str,
) -> str:
    """sha256 over everything the features depend on: the settings, the models, the samples and the ``kernels``
    that compute them (:func:`~library.runtime.kernel_signature`: the thread count and the batch size move a UNet
    pass's last bits); a fully fine-tuned UNet's weights sha256 too (left out when there is none)."""
    doc = {
        "format": FEATURE_FORMAT,
        "kernels": kernels,
        "base_fingerprint": base_fingerprint,
        "lora_sha256": lora_sha256,
        "manifest_sha256": manifest_sha256,
        "n_samples": n_samples,
        "image_conversion": IMAGE_CONVERSION,  # latents of images decoded another way are other samples
        "settings": settings.value_dict(),
        **({"unet_sha256": unet_sha256} if unet_sha256 is not None else {}),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def applied_lora(bundle: Any, lora_path: str | Path | LoraSource | None, multiplier: float, device: torch.device,
                 dtype: torch.dtype, unet: UNetWeights | None = None) -> Iterator[Any]:
    """The model under audit for the duration of the block; yields the applied LoRA network, or None.

    ``unet`` (a full fine-tune, :mod:`library.eval.unet_weights`) swaps its weights into the bundle's UNet, and
    its own text encoder's, if it has one, into the bundle's (the network stays None, so probes see a model
    without LoRA and group the UNet's own blocks); ``lora_path`` applies a kohya / diffusers / PEFT LoRA file (or
    the :class:`~networks.lora_io.LoraSource` read of one) to the UNet and text encoder; neither is the base
    model. A LoRA or UNet for another model raises :class:`~library.errors.ModelError` before anything is patched;
    the base weights are back even if the block fails.
    """
    with contextlib.ExitStack() as stack:
        if unet is not None:
            stack.enter_context(swapped_weights(bundle.unet, load_unet_state_dict(unet, bundle.unet)))
            if unet.text_encoder:  # a fine-tune that trained its text encoder is audited with it
                stack.enter_context(swapped_weights(bundle.text_encoder,
                                                    load_text_encoder_state_dict(unet, bundle.text_encoder)))
        if lora_path is None:
            yield None
            return
        from networks.lora import create_network_from_weights

        network, _ = create_network_from_weights(multiplier, lora_path, bundle.vae, bundle.text_encoder, bundle.unet)
        network.apply_to(bundle.text_encoder, bundle.unet)
        stack.callback(network.restore)
        network.to(device=device, dtype=dtype)
        network.requires_grad_(False)
        network.eval()
        yield network


class FeatureEngine:
    """Computes (or loads from cache) :class:`ModelFeatures` for the base model and its LoRAs."""

    def __init__(
        self,
        bundle: Any,
        settings: FeatureSettings,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        cache_dir: str | Path | None = None,
        base_fingerprint: str,
        manifest_sha256: str,
        progress: bool = True,
    ) -> None:
        self.bundle = bundle
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.base_fingerprint = base_fingerprint
        self.manifest_sha256 = manifest_sha256
        self.progress = progress

    # -- cache ------------------------------------------------------------------------------------
    def _cache_file(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"mia-features-{key[:32]}.safetensors"

    def _read_cache(self, key: str, n: int) -> dict[str, torch.Tensor] | None:
        file = self._cache_file(key)
        if file is None or not file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception:  # an unreadable cache file is only a miss: the features can be recomputed
            return None
        k, m = len(self.settings.timesteps), self.settings.num_noise_draws
        losses = tensors.get("losses")
        if meta.get("key") != key or losses is None or tuple(losses.shape) != (n, k, m):
            return None
        if self.settings.paper_row and ("paper" not in tensors or tensors["paper"].dim() != 3
                                        or tuple(tensors["paper"].shape[:2]) != (n, self.settings.paper_draws)):
            return None
        if not all(torch.isfinite(t.float()).all() for t in tensors.values()):
            return None
        return tensors

    def _write_cache(self, key: str, name: str, tensors: dict[str, torch.Tensor], lora_sha256: str | None,
                     unet_sha256: str | None = None) -> None:
        file = self._cache_file(key)
        if file is None:
            return

        meta = {
            "format": FEATURE_FORMAT,
            "key": key,
            "model": name,
            "lora_sha256": lora_sha256 or "",
            "unet_sha256": unet_sha256 or "",
            "base_fingerprint": self.base_fingerprint,
            "manifest_sha256": self.manifest_sha256,
            "settings": json.dumps(self.settings.value_dict(), sort_keys=True),
        }
        write_safetensors(file, {k: v.contiguous() for k, v in tensors.items()}, meta)

    # -- compute ----------------------------------------------------------------------------------
    def compute(
        self,
        name: str,
        samples: Sequence[Sample],
        latents: torch.Tensor,
        lora_path: str | Path | LoraSource | None = None,
        lora_sha256: str | None = None,
        probes: Sequence[Probe] = (),
        unet: UNetWeights | None = None,
    ) -> ModelFeatures:
        """Features of the base model (``lora_path`` and ``unet`` None), of the base model + one LoRA, or of the
        base model with a fully fine-tuned UNet: the fixed-t losses (and the paper's row) and the outputs of
        ``probes`` (:mod:`library.eval.probes`), each cached on its own (the UNet's sha256 in both keys)."""
        n = len(samples)
        if latents.shape[0] != n:
            raise ValueError(f"{n} samples but {latents.shape[0]} latents")
        unet_sha256 = None if unet is None else unet.sha256
        key = feature_cache_key(self.settings, self.base_fingerprint, lora_sha256, self.manifest_sha256, n,
                                unet_sha256, kernels=self.kernels())
        cached = self._read_cache(key, n)
        probe_cache = ProbeCache(self.cache_dir)
        identity = self.model_identity(lora_sha256, n, unet_sha256)
        runs, pending = cached_probe_runs(probes, probe_cache, identity, n)
        tensors = cached
        if cached is None or pending:  # the model is applied only when something must be computed
            with applied_lora(self.bundle, lora_path, self.settings.multiplier, self.device, self.dtype,
                              unet) as network:
                if cached is None:
                    tensors = self._run(name, samples, latents)
                    self._write_cache(key, name, tensors, lora_sha256, unet_sha256)
                model = ModelContext(self.bundle, samples, self.device, self.dtype, self.settings.seed,
                                     self.settings.resolution, self.settings.clip_skip,
                                     self.settings.max_token_length, network=network,
                                     latent_mode=self.settings.latent_mode)
                runs.update(compute_probes(pending, model, latents, batch_size=self.batch_size, cache=probe_cache))
        assert tensors is not None
        return ModelFeatures(name, tensors["losses"].float(), tensors.get("paper"), tensors.get("paper_timesteps"),
                             cache_key=key, cache_hit=cached is not None,
                             probes={p: run.outputs for p, run in runs.items()},
                             probe_runs={p: {"cache_key": run.cache_key, "cache_hit": run.cache_hit,
                                             "queries_computed": run.queries_computed, "seconds": run.seconds}
                                         for p, run in runs.items()})

    def kernels(self) -> str:
        """The kernels this engine's queries run on now (read inside the caller's thread set-up)."""
        return kernel_signature(self.device, self.batch_size)

    def model_identity(self, lora_sha256: str | None, n_samples: int,
                       unet_sha256: str | None = None) -> dict[str, Any]:
        """What a probe's outputs depend on besides the probe itself: the model (a fully fine-tuned UNet's
        sha256 only when there is one), the samples, the settings shared by every query (not the loss features'
        timesteps and draws) and the kernels they run on."""
        shared = {k: v for k, v in self.settings.as_dict().items()
                  if k not in ("timesteps", "num_noise_draws") and not k.startswith("paper_")}
        identity = {"base_fingerprint": self.base_fingerprint, "lora_sha256": lora_sha256,
                    "manifest_sha256": self.manifest_sha256, "n_samples": n_samples, "settings": shared,
                    "kernels": self.kernels()}
        if unet_sha256 is not None:
            identity["unet_sha256"] = unet_sha256
        return identity

    @torch.no_grad()
    def _run(self, name: str, samples: Sequence[Sample], latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The features of the applied model: every query of :func:`plan_queries`, ``batch_size`` at a time."""
        settings = self.settings
        n, k, m = len(samples), len(settings.timesteps), settings.num_noise_draws
        queries = plan_queries(samples, settings)
        losses = torch.full((n, k * m), float("nan"))
        paper: torch.Tensor | None = None  # h''s inputs [N, D, F]: an error map or the loss per draw
        paper_t: torch.Tensor | None = None  # their timesteps [N, D]
        if settings.paper_row:
            width = latents[0].numel() if settings.paper_features == "error_map" else 1
            paper = torch.empty((n, settings.paper_draws, width), dtype=torch.float32)
            paper_t = torch.full((n, settings.paper_draws), -1, dtype=torch.long)
        bar = tqdm(total=len(queries), desc=f"features [{name}]", unit="query", disable=not self.progress, leave=False)
        try:
            for start in range(0, len(queries), self.batch_size):
                chunk = queries[start : start + self.batch_size]
                errors = self._chunk_errors(chunk, samples, latents)
                self._store_rows(chunk, errors, losses, paper, paper_t)
                bar.update(len(chunk))
        finally:
            bar.close()
        self._check_finite(name, losses)
        out = {"losses": losses.view(n, k, m)}
        if paper is not None and paper_t is not None:
            out["paper"] = paper
            out["paper_timesteps"] = paper_t
        return out

    def _chunk_errors(self, chunk: Sequence[Query], samples: Sequence[Sample], latents: torch.Tensor) -> torch.Tensor:
        """The UNet's squared noise-prediction errors of one chunk of queries, one row per query."""
        settings = self.settings
        idx = torch.tensor([q.sample for q in chunk])
        # Encode each distinct caption of the chunk once (with the LoRA's text encoder, if it has one).
        captions = [samples[q.sample].caption for q in chunk]
        distinct = list(dict.fromkeys(captions))
        states = encode_prompts(self.bundle.tokenizer, self.bundle.text_encoder, distinct,
                                max_token_length=settings.max_token_length, clip_skip=settings.clip_skip)
        cond = states[torch.tensor([distinct.index(c) for c in captions])]
        latent_shape = tuple(latents.shape[1:])
        draw = NoiseDraw(
            torch.tensor([q.timestep for q in chunk], dtype=torch.long, device=self.device),
            torch.stack([query_noise(q, latent_shape) for q in chunk]).to(self.device, self.dtype),
        )
        return denoising_errors(self.bundle.unet, self.bundle.noise_scheduler,
                                latents[idx].to(self.device, self.dtype), cond.to(self.dtype), draw)

    def _store_rows(self, chunk: Sequence[Query], errors: torch.Tensor, losses: torch.Tensor,
                    paper: torch.Tensor | None, paper_t: torch.Tensor | None) -> None:
        """Write a chunk's rows in place: fixed-t queries into ``losses`` [N, K*M] (Eq. 1's loss), paper queries
        into ``paper`` [N, D, F] and their t into ``paper_t`` [N, D]."""
        row_losses = per_sample_loss(errors).float().cpu()
        # h''s error maps leave the device once per chunk, not once per row
        maps = errors.flatten(1).float().cpu() if paper is not None and self.settings.paper_features == "error_map" \
            and any(q.slot < 0 for q in chunk) else None
        for row, q in enumerate(chunk):
            if q.slot >= 0:
                losses[q.sample, q.slot] = row_losses[row]
                continue
            assert paper is not None and paper_t is not None  # paper queries are planned only with settings.paper_row
            paper[q.sample, -1 - q.slot] = maps[row] if maps is not None else row_losses[row : row + 1]
            paper_t[q.sample, -1 - q.slot] = q.timestep

    def _check_finite(self, name: str, losses: torch.Tensor) -> None:
        """Raise :class:`~library.errors.ModelError` if any loss is NaN/inf (a model that cannot be audited)."""
        if torch.isfinite(losses).all():
            return
        from library.errors import ModelError

        advice = ("try --mixed_precision no" if self.dtype != torch.float32 else
                  "in fp32 its weights (or the base model's) must hold values too large to compute with")
        raise ModelError(f"model '{name}' gives NaN/inf noise predictions ({advice})")


__all__ = [
    "FEATURE_FORMAT",
    "FeatureEngine",
    "FeatureSettings",
    "ModelFeatures",
    "Query",
    "Sample",
    "applied_lora",
    "feature_cache_key",
    "noise_seed",
    "paper_timestep",
    "plan_queries",
    "query_noise",
]
