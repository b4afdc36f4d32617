"""The configuration of ``evaluate_mia.py``: one dataclass = CLI flags = TOML keys (see :mod:`library.config`).

Defaults follow the paper's evaluation protocol where it states one (App. E: a fresh h' with h_w's
architecture, 100 epochs, Adam 1e-5, balanced batches, features = the squared-error map at a random t) and
``docs/evaluation.md`` where it does not (loss at fixed small timesteps, several noise draws shared by
every model, honest thresholds and checkpoints chosen on D_aux, bootstrap CIs).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from library.config import option, square_size
from library.errors import ConfigError

# Both registries import no torch: the choices below (and so --help) are read from them.
from library.eval.attacks.registry import ATTACK_NAMES, DEFAULT_ATTACKS
from library.eval.extractors import EXTRACTORS, weights_flags, with_weights
from library.foreign_keys import VAE_FOREIGN_KEY, SiblingKeys

PAPER_FEATURES = ("error_map", "loss", "multi_t_loss")
IMAGE_SPACE_ATTACKS = ("blackbox", "reconstruction")  # they read --digit_feature_weights / --inception_weights
NORMALIZATIONS = ("none", "log", "standardize", "log_standardize")
PFAMI_ERRORS = ("loss", "step_back")  # the public SD scripts' denoising loss; SecMI's step-back error
PFAMI_LOSS_TIMESTEPS = tuple(range(50, 501, 50))  # CopyMark's SD script: attack timesteps 0 .. 450, each + 50


MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed takes as a non-negative int64 (as in training)
MIN_BOOTSTRAP = 10  # the fewest resamples whose 2.5 / 97.5 percentiles still span an interval


def _check_seed(name: str, value: int, span: int = 1) -> None:
    """A seed (and the ``span - 1`` seeds after it, for per-image seeds) must be in [0, MAX_SEED]."""
    top = MAX_SEED - (span - 1)
    if not 0 <= value <= top:
        limit = "2**63 - 1" if span == 1 else f"2**63 - {span} (image i uses {name} + i)"
        raise ConfigError(f"'{name}' must be an integer in [0, {limit} = {top}] (a 64-bit seed), got {value}")


@dataclasses.dataclass
class EvalConfig:
    # Other tools' options we do not take, each with what to do instead (kohya users bring --vae).
    FOREIGN_KEYS = {"vae": VAE_FOREIGN_KEY}
    # Unmistakable training keys: a training TOML given here is named as one (library.foreign_keys).
    SIBLING_KEYS = SiblingKeys("train_*.py", frozenset({
        "network_dim", "network_alpha", "network_args", "network_module", "train_batch_size", "learning_rate",
        "unet_lr", "lr_scheduler", "optimizer_type", "max_train_epochs", "max_train_steps", "output_name",
        "save_every_n_epochs", "privacy_lambda", "train_data_dir", "resume"}),
        "evaluate_mia.py reads how a LoRA was trained from the file itself: pass the saved LoRA(s) with "
        "--network_weights, the run's --split_manifest and the base model (--pretrained_model_name_or_path), as "
        "flags or in an evaluation TOML (docs/evaluation.md)")

    # --- what to evaluate ----------------------------------------------------------------------
    pretrained_model_name_or_path: Optional[str] = option(
        None, "SD v1.x base model the LoRAs were trained on: a local diffusers folder or a single .safetensors",
        path=True)
    tokenizer_path: Optional[str] = option(
        None, "local CLIP tokenizer folder (for a single file without one)", path=True)
    network_weights: list[str] = option(
        [], "LoRA .safetensors file(s) to attack; the base model (no LoRA) is always evaluated too, as row 'base'",
        path=True)
    network_multiplier: float = option(1.0, "LoRA strength used for every LoRA")
    unet_weights: list[str] = option(
        [], "fully fine-tuned UNet(s) of this base model to attack, each a diffusers UNet folder (config.json + "
        "weights, or a pipeline folder with unet/ and text_encoder/) or an SD single-file .safetensors (its UNet, "
        "and its text encoder when trained)", path=True)
    split_manifest: Optional[str] = option(
        None, "split manifest JSON the LoRAs were trained with (D_aux / D_te)", path=True)
    allow_manifest_mismatch: bool = option(
        False, "evaluate a LoRA whose metadata names another split manifest, continues a LoRA of another split, or "
        "records none (trained on a whole folder): its membership labels may be wrong")
    allow_base_mismatch: bool = option(
        False, "evaluate a LoRA whose metadata names another base model (smp_lora.base_fingerprint) than "
        "--pretrained_model_name_or_path")
    allow_pickle: bool = option(
        False, "load pickle .bin/.ckpt weights of the base model (unsafe: only for files you trust)")

    # --- features --------------------------------------------------------------------------------
    resolution: Optional[int] = option(
        None, "image resolution in pixels (resize short side + centre crop; 512 or 512,512); default: the LoRAs' "
        "training resolution (their ss_resolution metadata), else the base model's own (its UNet's sample_size x "
        "the VAE's downscale: 512 for SD v1.5)", parse=square_size)
    timesteps: list[int] = option([50, 100, 200, 350], "fixed timesteps of the loss features (membership lives at small t)")
    num_noise_draws: int = option(2, "noise draws M per (sample, timestep); the same noise is used for every model")
    batch_size: int = option(16, "UNet queries per forward pass")
    vae_batch_size: int = option(8, "images per VAE pass when encoding latents")
    latent_mode: str = option(
        "mean", "what the clean latent z_0 of an image (and of PFAMI's crops) is: mean = the VAE posterior's mean; "
        "sample = one posterior draw per image, seeded by the image's content and --seed, the same for every model "
        "(the public attack scripts sample)", choices=["mean", "sample"])
    seed: int = option(
        0, "seed of the noise, the attack models, the hold-out split and the bootstrap, in [0, 2**63 - 1]")
    clip_skip: Optional[int] = option(
        None, "use the N-th last CLIP layer (the paper's runs use 2); default: as the LoRAs were trained (their "
        "ss_clip_skip metadata), 1 for the base model alone")
    max_token_length: Optional[int] = option(
        None, "75, 150 or 225 caption tokens; default: as the LoRAs were trained (their ss_max_token_length "
        "metadata), 75 for the base model alone", choices=[75, 150, 225])
    allow_conditioning_mismatch: bool = option(
        False, "use --clip_skip / --max_token_length / --resolution even where a LoRA's metadata records other training "
        "values")
    mixed_precision: str = option("no", "dtype of the models during feature extraction", choices=["no", "fp16", "bf16"])
    device: str = option("auto", "torch device ('auto' = cuda if available, else cpu)")
    cache_dir: Optional[str] = option(
        None, "where latents and features are cached (default <output_dir>/cache)", path=True)
    no_cache: bool = option(False, "do not read or write cached features (latents are still cached in memory)")
    jobs: int = option(
        1, "models processed at once (features, attacks, quality samples), each in a worker process with its own "
        "copy of the base model: for CPU boxes (2 on 2 cores halves the time); keep 1 on a GPU")
    threads: int = option(
        1, "torch threads of each model's job (features, attacks, quality samples), in a worker or in this process "
        "alike: a job's floats depend on its thread count, so this, not --jobs, fixes the numbers (more help one "
        "large model on a many-core CPU)")
    full_determinism: bool = option(
        False, "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN without autotuning, "
        "CUBLAS_WORKSPACE_CONFIG), in every worker too, as training's --full_determinism: a GPU evaluation repeats "
        "bit for bit; no effect on the CPU; its features are cached apart from those of the default kernels")

    # --- attacks ---------------------------------------------------------------------------------
    attacks: list[str] = option(list(DEFAULT_ATTACKS), "attacks to run", choices=list(ATTACK_NAMES))
    paper_features: str = option(
        "error_map", "what the paper's h' sees: the squared-error map at one random t (paper), the scalar loss "
        "at that t, or the losses at --timesteps", choices=list(PAPER_FEATURES))
    paper_min_timestep: int = option(0, "smallest random t of the paper's features")
    paper_max_timestep: int = option(1000, "one past the largest random t of the paper's features")
    paper_draws: int = option(
        1, "independent (t, eps) draws per sample for h' (paper: not said; 1 = upstream's one query). With D > 1, "
        "h' trains on draw (epoch mod D) of each sample, as upstream's monitor re-draws every pass, and scores the "
        "mean p(member) over the D draws; D queries per sample. One draw over the whole schedule leaves h' near "
        "chance even on LoRAs the loss attack separates (docs/paper-fidelity.md): the demo passes 16 with "
        "--paper_max_timestep 500")
    paper_epochs: int = option(100, "epochs of h' training (paper: 100)")
    paper_lr: float = option(1e-5, "Adam learning rate of h' (paper: 1e-5)")
    paper_weight_decay: float = option(1e-4, "Adam weight decay of h' (upstream: 1e-4)")
    paper_batch_size: int = option(1, "members per balanced h' batch (as many non-members; upstream: 1)")
    paper_dropout: float = option(0.5, "dropout of h' (upstream: 0.5)")
    paper_normalization: str = option("log_standardize", "input normalisation of h' (see library.privacy)",
                                      choices=list(NORMALIZATIONS))
    holdout_fraction: float = option(
        0.2, "part of D_aux held out to choose h''s epoch honestly (0 = no honest h', only the paper's oracle)")

    # --- the attack suite (docs/attacks.md): each attack's settings -------------------------------
    secmi_timestep: int = option(
        150, "SecMI: t_SEC, where the deterministic DDIM inversion stops (SecMI's SD code: 150; its DDPM setting: 100)")
    secmi_step: int = option(10, "SecMI: DDIM step k of the inversion and of the step back (paper: 10)")
    pia_timesteps: list[int] = option(
        [50, 100, 200, 300], "PIA / PIAN: candidate timesteps (one is chosen on D_aux; 1 query each + eps_0)")
    pia_norm: int = option(4, "PIA / PIAN: p of the ||eps(z_t, t) - eps_0||_p^p statistic (paper: 4)")
    clid_timesteps: list[int] = option([440, 450, 460], "CLiD: timesteps, one shared noise per t (paper)")
    clid_mask_fractions: list[float] = option(
        [0.3, 0.5, 0.7], "CLiD: fractions of caption words replaced by <|endoftext|> (degraded captions; plus "
        "the empty caption)")
    gsa_timesteps: int = option(10, "GSA: K, the timesteps t_j = j*1000/K - 1 of the gradient features (paper: 10)")
    sima_timesteps: list[int] = option(
        [0, 10, 20, 50, 100], "SimA: candidate small timesteps of ||eps(z_0, t)|| (one is chosen on D_aux)")
    sima_norm: int = option(2, "SimA: p of the mean |eps(z_0, t)|^p statistic")
    pfami_perturbations: int = option(
        10, "PFAMI: P, centre-crop perturbations of each query image (public SD script: 10)")
    pfami_error: str = option(
        "loss", "PFAMI: the model's error on each version: loss = the denoising loss with paired noise at "
        "--pfami_loss_timesteps, as the public SD scripts ((1 + P) x their number queries); step_back = SecMI's "
        "step-back error (--secmi_timestep, --secmi_step; (1 + P) x (t_SEC/k + 1) queries)",
        choices=list(PFAMI_ERRORS))
    pfami_loss_timesteps: list[int] = option(
        list(PFAMI_LOSS_TIMESTEPS), "PFAMI with --pfami_error loss: its timesteps (CopyMark's SD script: 50 .. 500)")
    pfami_crop_range: list[float] = option(
        [0.95, 0.7], "PFAMI: crop fractions of the first and last perturbation, the others evenly spaced between "
        "(public SD script: 0.95 0.7)")
    blackbox_num_images: int = option(
        8, "black-box: images generated per distinct caption (the query's nearest one is its score)")
    blackbox_steps: int = option(20, "black-box and reconstruction: DDIM sampling steps")
    blackbox_guidance_scale: float = option(7.5, "black-box and reconstruction: classifier-free guidance scale")
    reconstruction_strength: float = option(
        0.5, "reconstruction: how far the query is noised before it is denoised (img2img strength, 0-1)")
    reconstruction_repeats: int = option(1, "reconstruction: noisings per query (averaged; Pang & Wang: 3)")
    rediffuse_timesteps: list[int] = option(
        [10, 50], "ReDiffuse: each t how far the variations noise the query (paper's SD setting: 10; the authors' "
        "script: 50); the classifier weighs them on D_aux")
    rediffuse_interval: int = option(
        0, "ReDiffuse: k, the DDIM step of the way back; 0 = one step from t (k = t, as both the paper's SD setting "
        "and the authors' script)")
    rediffuse_variations: int = option(
        10, "ReDiffuse: n, variations averaged per query (paper's SD setting: 10; the authors' script: 1)")
    rediffuse_guidance_scale: float = option(
        1.0, "ReDiffuse: classifier-free guidance of the variations (1 = none; the authors' script: 7.5)")
    epsilon_delta: float = option(1e-5, "empirical epsilon: the delta of the (epsilon, delta) lower bound")
    audit_alpha: float = option(0.01, "set-level audit: the p-value a suspect set must reach")

    # --- utility: sample quality (library.eval.quality) -------------------------------------------------
    quality: bool = option(
        False, "generate images from the D_te captions with every model, save samples_<model>.png and compute "
        "Fréchet distance / KID against real images (see --quality_features)")
    quality_num_images: int = option(64, "images generated per model (D_te captions cycled, seed quality_seed + i)")
    quality_sampler: str = option("ddim", "sampler of the quality images", choices=["ddim", "euler"])
    quality_steps: int = option(20, "sampling steps of the quality images")
    quality_guidance_scale: float = option(7.5, "classifier-free guidance scale of the quality images")
    quality_seed: int = option(0, "seed of image i is quality_seed + i, the same for every model")
    quality_reference: str = option(
        "members", "real images the samples are compared with: members = D_tr, the LoRA's training images (as the "
        "paper), nonmembers, or test = D_te", choices=["members", "nonmembers", "test"])
    quality_features: list[str] = option(
        [], "feature extractors (default: every one whose weights are given): digits = PROXY learned-feature "
        "FD/KID of the demo's digit classifier (never FID); inception = real FID/KID", choices=list(EXTRACTORS))
    digit_feature_weights: Optional[str] = option(
        None, "digit feature net file for --quality_features digits", path=True)
    inception_weights: Optional[str] = option(
        None, "local FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth); never downloaded", path=True)
    quality_kid_subsets: int = option(100, "KID subsets (subset size = min(1000, n_real, n_generated))")
    utility_reference: Optional[str] = option(
        None, "model (report name) whose gain over the base is the unit of the utility retained U (needs a classifier "
        "among --quality_features, e.g. digits); default: the one plain-LoRA file evaluated, if there is exactly one")

    # --- metrics and output ----------------------------------------------------------------------
    n_bootstrap: int = option(1000, f"bootstrap resamples for the 95% CIs (0 = no CIs, else >= {MIN_BOOTSTRAP})")
    output_dir: str = option("mia_eval", "where report.json, report.md, scores.csv and the plots go", path=True)
    overwrite: bool = option(
        False, "replace the report of an earlier evaluation in --output_dir (without it such a folder is refused, so a "
        "finished evaluation is never lost; its cached features are reused either way)")
    plots: bool = option(True, "draw roc.png, roc_loglog.png and hist.png")
    dry_run: bool = option(
        False, "check the flags, the base model's files, the manifest (its images included), the models' files and "
        "training conditioning, the quality weights and the output folder, print the plan and exit; loads no SD "
        "weights, computes and writes nothing")
    progress_bar: bool = option(True, "show tqdm progress bars")

    @property
    def image_space_attacks(self) -> list[str]:
        """The attacks of ``attacks`` that compare images in a feature space (they use the extractors)."""
        return [a for a in self.attacks if a in IMAGE_SPACE_ATTACKS]

    def validate(self) -> None:
        """Cross-field checks; each failure is one ConfigError line naming the flag."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("'pretrained_model_name_or_path' is required (the base model the LoRAs were trained on)")
        if not self.split_manifest:
            raise ConfigError("'split_manifest' is required (the split manifest the LoRAs were trained with)")
        for name in ("resolution", "num_noise_draws", "batch_size", "vae_batch_size", "paper_epochs", "paper_draws",
                     "paper_batch_size", "jobs", "threads"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        if self.clip_skip is not None and self.clip_skip <= 0:
            raise ConfigError(f"'clip_skip' must be > 0, got {self.clip_skip}")
        _check_seed("seed", self.seed)
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"'resolution' must be a multiple of 8, got {self.resolution}")
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ConfigError("'timesteps' must be a non-empty list of integers in [0, 1000)")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ConfigError(f"'timesteps' lists a timestep twice: {self.timesteps}")
        if not 0 <= self.paper_min_timestep < self.paper_max_timestep <= 1000:
            raise ConfigError("need 0 <= paper_min_timestep < paper_max_timestep <= 1000")
        if not self.attacks:
            raise ConfigError(f"'attacks' must name at least one of {list(ATTACK_NAMES)}")
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"'attacks' lists an attack twice: {self.attacks}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"'holdout_fraction' must be in [0, 1), got {self.holdout_fraction}")
        if not self.paper_lr > 0:
            raise ConfigError(f"'paper_lr' must be > 0, got {self.paper_lr}")
        if self.paper_weight_decay < 0:
            raise ConfigError(f"'paper_weight_decay' must be >= 0, got {self.paper_weight_decay}")
        if not 0.0 <= self.paper_dropout < 1.0:
            raise ConfigError(f"'paper_dropout' must be in [0, 1), got {self.paper_dropout}")
        if self.n_bootstrap < 0 or 0 < self.n_bootstrap < MIN_BOOTSTRAP:
            # percentiles of a handful of resamples are no interval (one resample: both bounds the same number)
            raise ConfigError(f"'n_bootstrap' must be 0 (no CIs) or at least {MIN_BOOTSTRAP} resamples, got "
                              f"{self.n_bootstrap} (default 1000; a few hundred give stable bounds)")
        for name in ("network_weights", "unet_weights"):
            values = [os.path.realpath(v) for v in getattr(self, name)]  # x.safetensors and ./x.safetensors too
            if len(set(values)) != len(values):
                twice = next(v for v, real in zip(getattr(self, name), values) if values.count(real) > 1)
                raise ConfigError(f"'{name}' lists a file twice: {twice}")
        if not math.isfinite(self.network_multiplier):
            raise ConfigError(f"'network_multiplier' must be a finite number, got {self.network_multiplier}")
        self._validate_attack_suite()
        self._validate_quality()

    def _validate_attack_suite(self) -> None:
        """The attack-suite settings: timesteps in range, positive counts, fractions in (0, 1)."""
        for name in ("pia_timesteps", "clid_timesteps", "sima_timesteps", "pfami_loss_timesteps"):
            values = getattr(self, name)
            if not values or any(not 0 <= t < 1000 for t in values) or len(set(values)) != len(values):
                raise ConfigError(f"'{name}' must be a non-empty list of distinct integers in [0, 1000)")
        if not 0 < self.secmi_step <= self.secmi_timestep < 1000 or self.secmi_timestep % self.secmi_step:
            raise ConfigError("need 0 < secmi_step <= secmi_timestep < 1000 with secmi_timestep a multiple of "
                              f"secmi_step, got secmi_timestep={self.secmi_timestep}, secmi_step={self.secmi_step}")
        for name in ("pia_norm", "sima_norm", "gsa_timesteps", "blackbox_num_images", "blackbox_steps",
                     "reconstruction_repeats", "pfami_perturbations", "rediffuse_variations"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        for name in ("gsa_timesteps", "blackbox_steps"):  # each picks that many distinct of the 1000 timesteps
            if getattr(self, name) > 1000:
                raise ConfigError(f"'{name}' must be at most 1000 (the training schedule's timesteps), got "
                                  f"{getattr(self, name)}")
        if self.pfami_error != "loss" and list(self.pfami_loss_timesteps) != list(PFAMI_LOSS_TIMESTEPS):
            raise ConfigError("'pfami_loss_timesteps' is only used with --pfami_error loss (the step-back error "
                              "runs along --secmi_timestep / --secmi_step): drop it or pass --pfami_error loss")
        if len(self.pfami_crop_range) != 2 or any(not 0.0 < f <= 1.0 for f in self.pfami_crop_range):
            raise ConfigError(f"'pfami_crop_range' must be two crop fractions in (0, 1] (first and last "
                              f"perturbation), got {self.pfami_crop_range}")
        if any(not 0.0 < f < 1.0 for f in self.clid_mask_fractions):
            raise ConfigError(f"'clid_mask_fractions' must lie in (0, 1), got {self.clid_mask_fractions}")
        timesteps = self.rediffuse_timesteps
        if not timesteps or any(not 0 < t < 1000 for t in timesteps) or len(set(timesteps)) != len(timesteps):
            raise ConfigError(f"'rediffuse_timesteps' must be a non-empty list of distinct integers in [1, 999], got "
                              f"{timesteps}")
        if self.rediffuse_interval < 0:
            raise ConfigError(f"'rediffuse_interval' must be >= 0 (0 = one DDIM step from t), got "
                              f"{self.rediffuse_interval}")
        if not 0.0 < self.reconstruction_strength <= 1.0:
            raise ConfigError(f"'reconstruction_strength' must be in (0, 1], got {self.reconstruction_strength}")
        if self.rediffuse_guidance_scale < 1.0:
            raise ConfigError(f"'rediffuse_guidance_scale' must be >= 1 (1 = no guidance), got "
                              f"{self.rediffuse_guidance_scale}")
        if self.blackbox_guidance_scale < 1.0:
            raise ConfigError(f"'blackbox_guidance_scale' must be >= 1 (1 = no guidance), got "
                              f"{self.blackbox_guidance_scale}")
        if not 0.0 <= self.epsilon_delta < 1.0:
            raise ConfigError(f"'epsilon_delta' must be in [0, 1), got {self.epsilon_delta}")
        if not 0.0 < self.audit_alpha < 1.0:
            raise ConfigError(f"'audit_alpha' must be in (0, 1), got {self.audit_alpha}")

    def _validate_quality(self) -> None:
        """--quality flags (library.eval.quality): extractors need their weights, weights need --quality."""
        for name in ("quality_num_images", "quality_steps", "quality_kid_subsets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        _check_seed("quality_seed", self.quality_seed, span=self.quality_num_images)
        if self.utility_reference is not None and not self.quality:
            raise ConfigError("'utility_reference' is only used with --quality (U is computed on the samples)")
        classifiers = [entry for entry in EXTRACTORS.values() if "utility_retained" in entry.notes]
        if self.utility_reference is not None and not with_weights(self, classifiers):
            raise ConfigError("'utility_reference' is the unit of U, the retained gain in conditional accuracy, which "
                              "needs a classifier among the quality features: give " + weights_flags(classifiers))
        # Each registered extractor names the field of its weight file (library.eval.extractors).
        weights = {name: (entry.weights_option, getattr(self, entry.weights_option))
                   for name, entry in EXTRACTORS.items()}
        if any(value for _, value in weights.values()) and self.quality_num_images < 2:
            raise ConfigError("'quality_num_images' must be >= 2 to compute Fréchet distances / KID")
        for extractor, (flag, value) in weights.items():
            if value and not self.quality and not self.image_space_attacks:
                raise ConfigError(f"'{flag}' is only used with --quality or the image-space attacks "
                                  f"{list(IMAGE_SPACE_ATTACKS)}; add --quality (or drop --{flag})")
            if extractor in self.quality_features and not value:
                raise ConfigError(f"'quality_features' lists {extractor!r} but --{flag} is not given")
            if value and self.quality_features and extractor not in self.quality_features:
                raise ConfigError(f"--{flag} is given but 'quality_features' {self.quality_features} omits "
                                  f"{extractor!r}; add it or drop --{flag}")
