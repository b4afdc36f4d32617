"""The VAE latent cache: every image encoded once, kept in memory and optionally on disk.

A cache entry is keyed on the image's bytes, the image conversion (:data:`library.data.images.IMAGE_CONVERSION`),
the VAE's fingerprint, the resolution and the encoding mode (and ``--full_determinism`` when it is on), and on the
kernels that encoded it (torch's version, the device, the thread count, the batch size), so a changed image, pixel
conversion, VAE, resolution or set of kernels can never be served a latent that differs, even in its last bits,
from the one it would encode now.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from library.data.images import IMAGE_CONVERSION, image_tensor, open_rgb
from library.errors import DataError, warn
from library.fileio import sha256_file, write_safetensors
from library.runtime import kernel_signature

LatentMode = Literal["mean", "sample"]
_CACHE_FORMAT = "smp-lora-latent-v1"


@torch.no_grad()
def encode_pixels(vae: Any, pixels: torch.Tensor, *, sample_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """SD latents (what the UNet sees: ``(mean - shift_factor) * scaling_factor``, float32 on the CPU) of
    ``pixels`` [B, 3, R, R] in [-1, 1]. ``sample_seeds`` (one per image): draw from the VAE's posterior with
    those seeds instead of taking its mean."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
    latents = dist.mean
    if sample_seeds is not None:
        eps = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed))
                           for seed in sample_seeds])
        latents = latents + dist.std * eps.to(device=latents.device, dtype=latents.dtype)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).float().cpu()


class LatentCache:
    """VAE latents of images, cached in memory and optionally as safetensors files in ``cache_dir``.

    ``mode="mean"`` (default) stores the mean of the VAE's posterior: deterministic, so a member image
    gets the same latent in training and evaluation (to the last bit on the same kernels). ``mode="sample"`` draws
    one sample per image (as kohya's cache does) from a generator seeded by the image's :meth:`content_key` and
    ``seed``, so it is reproducible too. Latents are multiplied by ``vae.config.scaling_factor`` (after subtracting
    ``shift_factor`` if the VAE has one), i.e. they are what the UNet sees.

    The key of an entry (:meth:`key_for_hash`) is a sha256 over its :meth:`content_key` (the image's bytes, the image
    conversion, ``vae_fingerprint``, the resolution and the mode; the seed in sample mode, ``full_determinism`` when
    it is on) and the kernels of the batch that encoded it. A disk file that cannot be read or does not match is
    recomputed and rewritten.
    """

    def __init__(
        self,
        vae: Any,
        vae_fingerprint: str,
        resolution: int,
        cache_dir: str | Path | None = None,
        batch_size: int = 16,
        *,
        mode: LatentMode = "mean",
        seed: int = 0,
        full_determinism: bool = False,
    ) -> None:
        if mode not in ("mean", "sample"):
            raise ValueError(f"mode must be 'mean' or 'sample', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.vae = vae
        # where the VAE runs picks its kernels, so it is part of every key (None: a cache used for its keys alone)
        self.device = next(vae.parameters()).device if vae is not None else torch.device("cpu")
        self.vae_fingerprint = vae_fingerprint
        self.resolution = int(resolution)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.mode: LatentMode = mode
        self.seed = seed
        self.full_determinism = full_determinism
        self._memory: dict[str, torch.Tensor] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded": 0}
        self._upscale_warned = False

    # -- keys ------------------------------------------------------------------------------------------
    def content_key(self, image_sha256: str) -> str:
        """What the latent of the image with content hash ``image_sha256`` is, on any kernels: the image, its
        conversion, the VAE, the resolution and the mode (and the seed in sample mode, ``full_determinism`` when it
        is on). It seeds the image's posterior draw in sample mode, so a sampled latent is the same in any batch."""
        parts = [_CACHE_FORMAT, IMAGE_CONVERSION, image_sha256, self.vae_fingerprint, str(self.resolution), self.mode]
        if self.mode == "sample":
            parts.append(str(self.seed))
        if self.full_determinism:
            parts.append("full_determinism")
        return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()

    def key_for_hash(self, image_sha256: str, batch: int) -> str:
        """Cache key of that latent encoded in a batch of ``batch`` images on this process's kernels
        (:func:`~library.runtime.kernel_signature`: a VAE pass's last bits depend on the batch size, the thread
        count and the device)."""
        text = f"{self.content_key(image_sha256)}\x1f{kernel_signature(self.device, batch)}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def key(self, path: str | Path, batch: int) -> str:
        """Cache key of the image at ``path`` as it is on disk now, encoded in a batch of ``batch``."""
        return self.key_for_hash(self._digest(path), batch)

    @staticmethod
    def _digest(path: str | Path) -> str:
        try:
            return sha256_file(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc} (restore it or remove it from the dataset)") from None

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.safetensors"

    # -- disk ------------------------------------------------------------------------------------------
    def _latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one latent: the VAE's latent channels, the resolution over its downsampling factor."""
        config = self.vae.config
        side = self.resolution // 2 ** (len(config.block_out_channels) - 1)
        return (config.latent_channels, side, side)

    def _read_disk(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        file = self._file(key)
        if not file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                meta = handle.metadata() or {}
                latent = handle.get_tensor("latent")
        except Exception:  # any unreadable file is just a cache miss: we can always recompute
            return None
        # a file with the right key but another shape (tampered, or written by a buggy tool) is a miss too: served,
        # it would break the batch it is stacked into, or train on a wrong-sized latent
        if meta.get("key") != key or tuple(latent.shape) != self._latent_shape() or not torch.isfinite(latent).all():
            return None
        return latent.float()

    def _write_disk(self, key: str, latent: torch.Tensor) -> None:
        if self.cache_dir is None:
            return

        meta = {
            "format": _CACHE_FORMAT,
            "key": key,
            "vae_fingerprint": self.vae_fingerprint,
            "resolution": str(self.resolution),
            "mode": self.mode,
        }
        write_safetensors(self._file(key), {"latent": latent.contiguous()}, meta)

    # -- encoding --------------------------------------------------------------------------------------
    def _warn_if_upscaled(self, path: Path, width: int, height: int) -> None:
        """An image whose short side is below the resolution is upscaled to fill it (blurred: the model learns the
        blur): said once per cache, naming the first such image."""
        if not self._upscale_warned and min(width, height) < self.resolution:
            warn(f"image {path} is {width}x{height}, smaller than the resolution {self.resolution}: it is upscaled to "
                 "fill it (and so are any others like it); prepare the images at that size or larger, or train at a "
                 "lower --resolution")
            self._upscale_warned = True

    def _encode(self, paths: Sequence[Path], content_keys: Sequence[str]) -> torch.Tensor:
        tensors = []
        for path in paths:  # each image decoded once: its size for the warning, its pixels to encode
            image = open_rgb(Path(path))
            self._warn_if_upscaled(path, *image.size)
            tensors.append(image_tensor(image, self.resolution))
        pixels = torch.stack(tensors)
        # One generator per image, seeded by its content key: a sampled latent does not depend on the batch.
        seeds = [int(k[:15], 16) for k in content_keys] if self.mode == "sample" else None
        latents = encode_pixels(self.vae, pixels, sample_seeds=seeds)
        self.stats["encoded"] += len(paths)
        return latents

    def get_many(self, paths: Sequence[str | Path], digests: Sequence[str] | None = None) -> torch.Tensor:
        """Latents of ``paths`` in order, shape (N, C, h, w), float32 on the CPU (N may be 0). ``digests``: the
        images' sha256 when the caller has verified them already (a split manifest's), so they are not hashed
        again."""
        paths = [Path(p) for p in paths]
        if not paths:
            # An empty set (say an aux split of size 0) gets an empty batch of the right shape.
            return torch.empty(0, *self._latent_shape())
        if digests is None:
            digests = [self._digest(p) for p in paths]
        elif len(digests) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(digests)} digests")
        unique: dict[str, Path] = {}  # digest -> a path; identical images are encoded once
        for path, digest in zip(paths, digests):
            unique.setdefault(digest, path)
        # Fixed batches of the request's images, whatever is cached already: the VAE's kernels depend on the batch
        # size, so encoding only the misses would make a latent's last bits depend on what another process had
        # written so far (issue 14, docs/determinism.md). A batch with a miss is encoded whole; hits keep their
        # value, and are keyed on their batch's size, so a latent is only ever served where it would be recomputed.
        found: dict[str, torch.Tensor] = {}
        todo = list(unique.items())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            keys = [self.key_for_hash(digest, len(chunk)) for digest, _ in chunk]
            cached = [self._lookup(key) for key in keys]
            if any(latent is None for latent in cached):
                batch = self._encode([p for _, p in chunk], [self.content_key(digest) for digest, _ in chunk])
                for i, (key, latent) in enumerate(zip(keys, batch)):
                    if cached[i] is None:
                        cached[i] = latent.clone()  # own storage, so the memory cache does not pin the whole batch
                        self._write_disk(key, cached[i])
                        self._memory[key] = cached[i]
            for (digest, _), latent in zip(chunk, cached):
                found[digest] = latent
        return torch.stack([found[d] for d in digests])

    def _lookup(self, key: str) -> torch.Tensor | None:
        """The latent under ``key`` from memory, else from disk (then kept in memory), else None."""
        if key in self._memory:
            self.stats["memory_hits"] += 1
            return self._memory[key]
        latent = self._read_disk(key)
        if latent is not None:
            self._memory[key] = latent
            self.stats["disk_hits"] += 1
        return latent

    def get(self, path: str | Path) -> torch.Tensor:
        """Latent of one image, shape (C, h, w)."""
        return self.get_many([path])[0]
