"""The training configuration shared by the entry scripts ``train_<method>.py`` (one per registered method).

Flag names follow kohya sd-scripts where a flag exists there; the privacy flags are this project's.
Defaults are the paper's (Table 5 / App. E) where it gives one: r 64 / alpha 32, lr 1e-4, lambda 0.05, delta
1e-5, attacker Adam lr 1e-5 with weight decay 1e-4, k = 1, batch size 1. The paper's text-encoder lr 1e-5 is set by
the shipped configs; without one, ``text_encoder_lr`` follows ``learning_rate`` as in sd-scripts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from library.config import option, square_size
from library.errors import ConfigError, warn
from library.foreign_keys import SiblingKeys
from library.outputs import check_inside
from library.privacy import validate_privacy_delta
from library.train.foreign_flags import SD_SCRIPTS_KEYS
from library.train.methods import method_names
from library.train.proxy_features import ProxyFeatures
from networks.lora_format import user_metadata

# Read from the method registry (library.train.methods.METHOD_REGISTRY), kept here for their importers.
METHODS = method_names(in_paper=True)  # the paper's three (the demo trains these)
BASELINES = method_names(in_paper=False)  # issue 7's reviewer baselines (RelaxLoss, DP-SGD)
ALL_METHODS = method_names()
MAX_SEED = 2**63 - 1  # the largest seed torch.manual_seed takes as a non-negative int64
OPTIMIZERS = ("AdamW", "AdamW8bit")


def optimizer_name(text: str) -> str:
    """``--optimizer_type`` in any case, as sd-scripts reads it (``adamw8bit`` is ``AdamW8bit``)."""
    return next((name for name in OPTIMIZERS if name.lower() == str(text).lower()), str(text))


# sd-scripts' networks/lora.py takes these as --network_args; this LoRA does not (LyCORIS has others).
KOHYA_ONLY_NETWORK_ARGS = frozenset({"rank_dropout", "module_dropout", "block_dims", "block_alphas", "conv_block_dims",
                                     "conv_block_alphas", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                                     "block_lr_zero_threshold", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                     "loraplus_text_encoder_lr_ratio"})


@dataclasses.dataclass
class TrainConfig:
    # Options that override one another (max_train_epochs, when set, replaces max_train_steps): one of them on the
    # command line drops the config file's value of the other (library.config), so the command line wins.
    OVERRIDE_GROUPS = (("max_train_steps", "max_train_epochs"),)
    # sd-scripts options we do not take, each with what to do instead (library.train.foreign_flags).
    FOREIGN_KEYS = SD_SCRIPTS_KEYS
    # Unmistakable evaluation keys: an evaluation TOML given here is named as one (library.foreign_keys).
    SIBLING_KEYS = SiblingKeys("evaluate_mia.py", frozenset({
        "attacks", "timesteps", "n_bootstrap", "audit_alpha", "num_noise_draws", "quality", "unet_weights",
        "holdout_fraction", "paper_epochs"}),
        "give it to evaluate_mia.py --config_file, and train with a training TOML (configs/<dataset>/<method>.toml)")

    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: Optional[str] = option(
        None, "SD v1.x base model: a local diffusers folder or a single .safetensors checkpoint", path=True)
    tokenizer_path: Optional[str] = option(
        None, "local CLIP tokenizer folder (needed for a single-file checkpoint that carries none)", path=True)
    allow_pickle: bool = option(
        False, "load pickle .bin/.ckpt weights of the base model (unsafe: only for files you trust)")

    # --- data --------------------------------------------------------------------------------
    split_manifest: Optional[str] = option(
        None, "split manifest JSON (scripts/make_split.py): the LoRA trains on its members (D_tr); "
        "MP/SMP-LoRA also use its aux sets (D^m_aux, D^nm_aux)", path=True)
    train_data_dir: Optional[str] = option(
        None, "plain LoRA only: train on every image of this captioned folder instead of a manifest", path=True)
    caption_extension: str = option(".txt", "caption file extension for --train_data_dir")
    resolution: int = option(512, "square training resolution in pixels (resize short side + centre crop); 512 or "
                             "sd-scripts' 512,512", parse=square_size)
    cache_latents: bool = option(True, "encode every image once with the VAE and keep the latents (always on: no "
                                 "augmentation is applied, so caching changes only speed; false is refused)")
    cache_latents_to_disk: bool = option(False, "also keep cached latents on disk (under <output_dir>/latent_cache)")
    latent_cache_dir: Optional[str] = option(
        None, "directory for on-disk latents (default <output_dir>/latent_cache)", path=True)
    vae_batch_size: int = option(8, "batch size for VAE encoding when caching latents")
    latent_mode: str = option(
        "mean", "what an image's cached latent is: mean = the VAE posterior's mean (deterministic, the latent an "
        "auditor encodes); sample = one posterior draw per image, drawn once and kept for the whole run (sd-scripts' "
        "--cache_latents and the paper's runs; seeded by the image's content and --seed)", choices=["mean", "sample"])
    shuffle_caption: bool = option(False, "shuffle comma-separated caption tags every time a caption is used")
    keep_tokens: int = option(0, "with --shuffle_caption: keep the first N tags in place")
    max_token_length: Optional[int] = option(None, "75 (default), 150 or 225 tokens of caption", choices=[75, 150, 225])
    clip_skip: int = option(1, "use the output of the N-th last CLIP layer (2 = penultimate, as the paper's runs)")

    # --- what is trained ----------------------------------------------------------------------
    train_mode: str = option(
        "lora", "what is trained, whatever the objective: lora = a LoRA/LoCon adapter (networks.lora), full = the "
        "UNet's own weights (full fine-tuning; saves an SD single file and a diffusers UNet folder)",
        choices=["lora", "full"])
    train_text_encoder: bool = option(
        False, "train_mode full: also train the text encoder's own weights (at text_encoder_lr)")

    # --- network -----------------------------------------------------------------------------
    network_module: str = option("networks.lora", "LoRA network module (only the built-in one is allowed)",
                                 choices=["networks.lora"])
    network_dim: int = option(64, "LoRA rank r (the paper's; sd-scripts' default is 4)")
    network_alpha: float = option(32.0, "LoRA alpha, scale = alpha / rank (the paper's; sd-scripts' default is 1)")
    network_dropout: Optional[float] = option(None, "dropout on the LoRA down-projection output")
    network_weights: Optional[str] = option(None, "continue training from this LoRA .safetensors file", path=True)
    dim_from_weights: bool = option(False, "with --network_weights: build the network from that file (each layer "
                                           "its rank and alpha, only the layers it adapts: also a file whose ranks "
                                           "differ), ignoring --network_dim / --network_alpha / conv_dim")
    network_train_unet_only: bool = option(False, "train the UNet LoRA only (no text-encoder LoRA)")
    network_args: list[str] = option(
        [], "key=value options for the network module, as sd-scripts: conv_dim=R conv_alpha=A also adapts the "
        "ResNet blocks' 3x3 convs (LoCon)")

    # --- optimisation ------------------------------------------------------------------------
    seed: int = option(1337, "random seed (data order, noise, initialisation), in [0, 2**63 - 1]")
    full_determinism: bool = option(
        False, "deterministic GPU kernels (torch.use_deterministic_algorithms, cuDNN without autotuning, "
        "CUBLAS_WORKSPACE_CONFIG), as transformers' --full_determinism: a seeded GPU run repeats bit for bit, "
        "slower; an op without a deterministic kernel warns. The CPU repeats without it")
    train_batch_size: int = option(1, "training batch size per process")
    max_train_epochs: Optional[int] = option(None, "number of epochs over D_tr (overrides max_train_steps)")
    max_train_steps: int = option(1600, "number of optimisation steps")
    gradient_accumulation_steps: int = option(1, "accumulate gradients over N batches")
    learning_rate: float = option(1e-4, "default learning rate")
    unet_lr: Optional[float] = option(None, "UNet LoRA learning rate (default: learning_rate; 0 = do not train it)")
    text_encoder_lr: Optional[float] = option(
        None, "text-encoder LoRA learning rate (default: learning_rate, as sd-scripts; the paper's configs set "
        "1e-5; 0 = no text-encoder LoRA)")
    optimizer_type: str = option("AdamW", "optimizer, in any case (AdamW8bit needs bitsandbytes)",
                                 choices=list(OPTIMIZERS), parse=optimizer_name)
    weight_decay: float = option(1e-2, "AdamW weight decay")
    lr_scheduler: str = option("constant", "learning-rate schedule",
                               choices=["constant", "constant_with_warmup", "cosine", "linear"])
    lr_warmup_steps: float = option(0, "warm-up steps of the lr schedule; a value below 1 is a ratio of the run's "
                                    "steps, as in sd-scripts (0.1: the first 10 %)")
    max_grad_norm: float = option(1.0, "clip the LoRA gradient to this global L2 norm (0 disables)")
    grad_normalize: bool = option(False, "normalise the LoRA gradient to unit L2 norm (paper Table 10 baseline)")
    mixed_precision: str = option("no", "autocast precision", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward to save memory")
    min_timestep: int = option(0, "smallest diffusion timestep sampled in training")
    max_timestep: int = option(1000, "one past the largest diffusion timestep sampled in training")

    # --- privacy (MP-LoRA / SMP-LoRA) --------------------------------------------------------
    privacy_lambda: float = option(
        0.05, "lambda of Eq. 6 / Eq. 10 (paper 0.05; upstream launchers used 1). SMP-LoRA warns above ~143, where "
        "the Eq. 10 denominator exceeds 100 already for an attacker at chance (G = log 1/2): the LoRA barely moves")
    privacy_delta: float = option(1e-5, "delta of Eq. 10, keeps the SMP denominator away from 0")
    attacker_lr: float = option(1e-5, "proxy attacker Adam learning rate (eta_1)")
    attacker_weight_decay: float = option(1e-4, "proxy attacker Adam weight decay")
    attacker_batch_size: int = option(1, "members and (as many) non-members per attacker step")
    attacker_dropout: float = option(0.5, "dropout in the proxy attacker MLP")
    k_steps: int = option(1, "attacker updates per LoRA update")
    attacker_every_n_steps: int = option(
        1, "run the attacker phase (Algorithm 1 lines 4-6) only every N-th LoRA step: its no-grad pass over "
        "2 x attacker_batch_size rows costs ~2/3 of a plain step, so N = 2 halves that overhead (1 = every step, "
        "the paper; G still enters every LoRA step)")
    attacker_features: str = option(
        "error_map", "what the proxy sees: the per-element squared error map (upstream), the per-sample "
        "loss, the losses at --attacker_timesteps, or (t, loss) at one random t (timestep-aware, one pass)",
        choices=["error_map", "loss", "multi_t_loss", "t_loss"])
    attacker_timesteps: list[int] = option([50, 100, 200, 350], "timesteps for --attacker_features multi_t_loss")
    attacker_max_timestep: Optional[int] = option(
        None, "t_loss only: the proxy's t is drawn below this (the band where membership lives), and G on the training "
        "batch counts only the rows of L_ada's forward whose t falls below it (default: max_timestep, every row)")
    attacker_noise: str = option(
        "fresh", "the proxy's (t, eps): a fresh draw every time (paper), or fixed: one draw per (image, t), the same "
        "every time (paired, low variance; see library.train.proxy_features)", choices=["fresh", "fixed"])
    attacker_calibration: str = option(
        "none", "base: the proxy sees loss(LoRA) - loss(frozen base) for the same (t, eps), the signal of the strongest "
        "evaluation attack (cached once with fixed noise, one more no-grad pass with fresh noise; needs loss "
        "features and a normalisation without log); both: the raw loss and that difference side by side, at the "
        "same cost", choices=["none", "base", "both"])
    attacker_restart: str = option(
        "none", "every --attacker_restart_every_n_epochs: reinit = a freshly initialised proxy, warm = reset its Adam "
        "state only", choices=["none", "reinit", "warm"])
    attacker_restart_every_n_epochs: int = option(10, "epochs between proxy restarts (with --attacker_restart)")
    attacker_normalization: str = option(
        "log_standardize", "feature normalisation inside the proxy", choices=["none", "log", "standardize",
                                                                              "log_standardize"])
    update_order: str = option("attacker_first", "Algorithm 1 order, or lora_first as the upstream code",
                               choices=["attacker_first", "lora_first"])
    g_noise: str = option("reuse", "G on the training batch reuses L_ada's (t, eps) forward, or draws fresh "
                          "noise with a second UNet pass (upstream)", choices=["reuse", "independent"])
    g_member_weight: float = option(1.0, "weight of the member term of G on D_tr (0.5 = literal Eq. 5)")
    g_attacker_dropout: bool = option(
        False, "keep h_w's dropout on while G is scored on the training batch, as upstream (train mode); default: "
        "eval mode, a deterministic G")
    attacker_eval_every_n_epochs: int = option(1, "monitor the proxy's accuracy on D_aux / D_te every N epochs")

    # --- baselines (train_relaxloss.py, train_dp_lora.py) ------------------------------------------
    relaxloss_alpha: Optional[float] = option(
        None, "RelaxLoss target: descend L_ada above it, ascend below (absolute; near the base model's held-out loss)")
    dp_noise_multiplier: float = option(1.0, "DP-SGD: Gaussian noise std as a multiple of dp_clip_norm (sigma)")
    dp_clip_norm: float = option(1.0, "DP-SGD: per-sample gradient L2 clip over all LoRA parameters (C)")
    dp_delta: float = option(1e-5, "DP-SGD: the delta of the reported (epsilon, delta); keep it below 1/|D_tr|")

    # --- DreamBooth: identifier and prior preservation (library.train.prior) ------------------------
    instance_token: Optional[str] = option(
        None, "DreamBooth: the identifier of the instance (e.g. sks); every member caption must contain it")
    with_prior_preservation: bool = option(
        False, "DreamBooth: denoise as many class images as members in every step and add their loss (the prior)")
    prior_loss_weight: float = option(1.0, "weight of the prior-preservation loss")
    prior_in_objective: bool = option(
        True, "the prior loss is part of L_ada, so Eq. 6 / Eq. 10 act on the DreamBooth loss as a whole; false: it is "
        "added after the method's objective, unscaled")
    class_data_dir: Optional[str] = option(
        None, "folder of class images (same-stem caption files, else class_prompt); the base model generates the "
        "missing ones up to num_class_images into it", path=True)
    class_prompt: Optional[str] = option(
        None, "caption of class images without a caption file, and the prompt that generates missing ones")
    num_class_images: int = option(100, "class images a run uses (the folder's first ones; diffusers' default 100)")
    class_sample_steps: int = option(50, "sampler steps for generating class images")

    # --- smoothness analysis (paper Fig. 1b) ---------------------------------------------------
    track_smoothness: bool = option(False, "log gradient norms and top Hessian eigenvalues (slow)")
    hessian_every_n_steps: int = option(100, "with --track_smoothness: Hessian power iteration every N steps")

    # --- output ------------------------------------------------------------------------------
    output_dir: str = option("output", "where LoRA files, states and logs go", path=True)
    output_name: Optional[str] = option(
        None, "base name of the output files, a plain file name (default: the method name)")
    overwrite: bool = option(
        False, "replace a finished run's <output_dir>/<output_name>.safetensors (without it such a run is refused; "
        "--resume of that run's own state needs no --overwrite)")
    save_precision: str = option("fp16", "dtype of the saved LoRA", choices=["float", "fp16", "bf16"])
    save_every_n_epochs: Optional[int] = option(None, "also save a LoRA every N epochs")
    save_every_n_steps: Optional[int] = option(None, "also save a LoRA every N steps")
    save_last_n_epochs: Optional[int] = option(
        None, "keep only the newest N of the --save_every_n_epochs files (older ones are deleted; default: all)")
    save_last_n_steps: Optional[int] = option(
        None, "keep only the --save_every_n_steps files of the last N steps (older ones are deleted; default: all)")
    save_state: bool = option(False, "save a resumable training state with every LoRA save and at the end")
    save_last_n_epochs_state: Optional[int] = option(
        None, "keep only the newest N epoch states (default: as --save_last_n_epochs)")
    save_last_n_steps_state: Optional[int] = option(
        None, "keep only the step states of the last N steps (default: as --save_last_n_steps)")
    resume: Optional[str] = option(
        None, "resume from a state directory written by --save_state, or 'latest': the state last written for "
        "<output_dir>/<output_name> (a new run when there is none)", path=True)
    logging_dir: Optional[str] = option(
        None, "tensorboard log directory; each run logs into <logging_dir>/<output_name>-<YYYYmmddHHMMSS> (default: none)",
        path=True)
    log_every_n_steps: int = option(10, "how often step metrics are logged")
    # what a saved file says of itself (sd-scripts' flags), written as given; never a path
    training_comment: Optional[str] = option(None, "a comment kept in the saved file's metadata (ss_training_comment)")
    metadata_title: Optional[str] = option(None, "modelspec.title of the saved files (default: each file's name)")
    metadata_author: Optional[str] = option(None, "modelspec.author of the saved files")
    metadata_description: Optional[str] = option(None, "modelspec.description of the saved files")
    metadata_license: Optional[str] = option(None, "modelspec.license of the saved files")
    metadata_tags: Optional[str] = option(None, "modelspec.tags of the saved files (comma-separated)")
    metadata_usage_hint: Optional[str] = option(None, "modelspec.usage_hint of the saved files (how to prompt the model)")
    metadata_trigger_phrase: Optional[str] = option(None, "modelspec.trigger_phrase of the saved files (e.g. the "
                                                    "instance token)")
    sample_prompts: Optional[str] = option(None, "text file of prompts to sample during training", path=True)
    sample_every_n_epochs: Optional[int] = option(None, "sample images from --sample_prompts every N epochs")
    sample_steps: int = option(20, "sampler steps for training-time samples")
    sample_at_first: bool = option(False, "also sample --sample_prompts before the first step (a new run: the "
                                   "base model's images, to compare the epochs' with)")
    progress_bar: bool = option(True, "show a tqdm progress bar")
    dry_run: bool = option(False, "validate model, data, output folders and config, print the plan and exit "
                           "without training (writes nothing)")

    @property
    def effective_unet_lr(self) -> float:
        """The UNet part's learning rate: ``unet_lr``, else ``learning_rate`` (sd-scripts' fallback)."""
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def effective_text_encoder_lr(self) -> float:
        """The text-encoder part's learning rate: ``text_encoder_lr``, else ``learning_rate``."""
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def network_kwargs(self) -> dict[str, str]:
        """``network_args`` as the keyword arguments of ``networks.lora.create_network``."""
        kwargs: dict[str, str] = {}
        for item in self.network_args:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"'network_args' entries are key=value (e.g. conv_dim=8), got {item!r}")
            kwargs[key.strip()] = value.strip()
        return kwargs

    def validate(self) -> None:
        """Cross-field checks; each failure is one ConfigError line naming the flag."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("'pretrained_model_name_or_path' is required (a diffusers folder or a .safetensors file)")
        if bool(self.split_manifest) == bool(self.train_data_dir):
            raise ConfigError("give exactly one of 'split_manifest' or 'train_data_dir' (to drop the one a TOML sets, "
                              "pass it empty on the command line: --split_manifest '')")
        positive = ["resolution", "network_dim", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                    "vae_batch_size", "attacker_batch_size", "k_steps", "attacker_every_n_steps", "log_every_n_steps",
                    "clip_skip", "hessian_every_n_steps", "attacker_eval_every_n_epochs", "sample_steps",
                    "attacker_restart_every_n_epochs", "num_class_images", "class_sample_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {getattr(self, name)}")
        for name in ["lr_warmup_steps", "keep_tokens"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"'{name}' must be >= 0, got {getattr(self, name)}")
        if self.lr_warmup_steps >= 1 or self.lr_warmup_steps == 0:  # steps, an int in the record as before
            if not float(self.lr_warmup_steps).is_integer():
                raise ConfigError(f"'lr_warmup_steps' must be a whole number of steps or a ratio below 1, got "
                                  f"{self.lr_warmup_steps}")
            self.lr_warmup_steps = int(self.lr_warmup_steps)
        for name in ["max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "sample_every_n_epochs",
                     "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state"]:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"'{name}' must be > 0, got {value}")
        self._validate_retention()
        self._validate_rates_and_seed()
        self._validate_outputs()
        if self.privacy_lambda < 0 or not math.isfinite(self.privacy_lambda):
            raise ConfigError(f"'privacy_lambda' must be a finite number >= 0, got {self.privacy_lambda}")
        if self.prior_loss_weight < 0 or not math.isfinite(self.prior_loss_weight):
            raise ConfigError(f"'prior_loss_weight' must be a finite number >= 0, got {self.prior_loss_weight}")
        if not (math.isfinite(self.g_member_weight) and self.g_member_weight > 0):
            raise ConfigError(f"'g_member_weight' must be a finite number > 0 (1 = the authors' code, 0.5 = literal "
                              f"Eq. 5), got {self.g_member_weight}")
        validate_privacy_delta(self.privacy_delta)
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError("need 0 <= min_timestep < max_timestep <= 1000")
        if any(not 0 <= t < 1000 for t in self.attacker_timesteps) or not self.attacker_timesteps:
            raise ConfigError("'attacker_timesteps' must be a non-empty list of integers in [0, 1000)")
        self._validate_proxy_features()
        self._validate_train_mode()
        overlap = {"dropout", "neuron_dropout", "train_unet_only", "apply_text_encoder", "weights_sd",
                   "for_inference"} & set(self.network_kwargs)  # the last two: Python-API arguments, not options
        if overlap:
            raise ConfigError(f"'network_args' sets {', '.join(sorted(overlap))}: use --network_dropout / "
                              "--network_train_unet_only / --network_weights instead")
        if unknown := sorted(set(self.network_kwargs) - {"conv_dim", "conv_alpha"}):
            kohya = sorted(set(unknown) & KOHYA_ONLY_NETWORK_ARGS)
            reason = (f"{', '.join(kohya)}: sd-scripts' LoRA options that this network does not have (it has "
                      "--network_dropout)" if kohya else "LyCORIS options are not supported")
            raise ConfigError(f"unknown network argument(s) {', '.join(unknown)}: --network_args takes conv_dim=R "
                              f"and conv_alpha=A (LoCon); {reason}")
        if self.resolution % 8:
            raise ConfigError(f"'resolution' must be a multiple of 8, got {self.resolution}")
        if not self.cache_latents:
            raise ConfigError("'cache_latents = false' is not supported: latents are always cached (no image "
                              "augmentation is applied, so caching changes nothing but speed)")
        if self.max_grad_norm < 0:
            raise ConfigError("'max_grad_norm' must be >= 0 (0 disables clipping)")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ConfigError("'lr_scheduler = constant' has no warm-up, so 'lr_warmup_steps' would be ignored; use "
                              "'lr_scheduler = constant_with_warmup', or 'lr_warmup_steps = 0'")
        if not 0 <= self.attacker_dropout < 1:
            raise ConfigError("'attacker_dropout' must be in [0, 1)")

    def _validate_retention(self) -> None:
        """A retention flag without the saves it prunes does nothing: one warning (sd-scripts ignores it silently,
        and its configs carry such keys)."""
        needs = {"save_last_n_epochs": ("save_every_n_epochs", self.save_every_n_epochs),
                 "save_last_n_steps": ("save_every_n_steps", self.save_every_n_steps),
                 "save_last_n_epochs_state": ("save_every_n_epochs", self.save_every_n_epochs and self.save_state),
                 "save_last_n_steps_state": ("save_every_n_steps", self.save_every_n_steps and self.save_state)}
        for name, (every, present) in needs.items():
            if getattr(self, name) is not None and not present:
                states = " and 'save_state'" if name.endswith("_state") else ""
                warn(f"'{name}' prunes the checkpoints of '{every}'{states}, which this run does not write, so it "
                     f"does nothing; set {every}{states}, or drop {name}")

    def _validate_rates_and_seed(self) -> None:
        """Rates torch would reject with a traceback (or, for a negative part rate, silently read as "off")."""
        for name in ["learning_rate", "unet_lr", "text_encoder_lr", "weight_decay", "attacker_lr",
                     "attacker_weight_decay"]:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                zero = " (0 means: do not train that part)" if name in ("unet_lr", "text_encoder_lr") else ""
                raise ConfigError(f"'{name}' must be a finite number >= 0{zero}, got {value}")
        # torch seeds are 64-bit; derived seeds (seed * 7919 + rank, ...) are reduced modulo 2**64 in the trainer
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"'seed' must be an integer in [0, 2**63 - 1 = {MAX_SEED}], got {self.seed}")

    def _validate_outputs(self) -> None:
        """A file name that leaves its folder, and metadata that would name where the data lives."""
        if self.output_name is not None:
            check_inside(self.output_dir, self.output_name, "--output_name")
            if self.output_name.lower().endswith(".safetensors"):  # sd-scripts appends it too: keep, but say so
                warn(f"'output_name' {self.output_name!r} ends in .safetensors, which the files get appended "
                     f"({self.output_name}.safetensors, as in sd-scripts); drop it from the name for "
                     f"{self.output_name[:-len('.safetensors')]}.safetensors")
        try:
            user_metadata(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _validate_train_mode(self) -> None:
        """Adapter flags in a full fine-tune (or the reverse) would be ignored silently: refuse them."""
        if self.train_mode == "full":
            if self.network_weights:
                raise ConfigError("'network_weights' continues a LoRA, but 'train_mode = full' trains the UNet's own "
                                  "weights; drop it (or use train_mode lora)")
            if self.network_args:  # a LoRA config file reused for a full fine-tune (the frontier does): say so
                warn(f"'network_args' {self.network_args} configure a LoRA; 'train_mode = full' ignores them")
        elif self.train_text_encoder:
            raise ConfigError("'train_text_encoder' is for 'train_mode = full'; a LoRA's text-encoder part is set by "
                              "text_encoder_lr / network_train_unet_only")
        if self.dim_from_weights and not self.network_weights:
            raise ConfigError("'dim_from_weights' builds the network from the --network_weights file; give one")

    def _validate_proxy_features(self) -> None:
        band = self.attacker_max_timestep
        if band is not None:
            if self.attacker_features != "t_loss":
                raise ConfigError("'attacker_max_timestep' bands the t of 'attacker_features = t_loss'; drop it, or "
                                  f"use t_loss (got {self.attacker_features})")
            if not self.min_timestep < band <= self.max_timestep:
                raise ConfigError(f"'attacker_max_timestep' must be in (min_timestep, max_timestep] = "
                                  f"({self.min_timestep}, {self.max_timestep}], got {band}")
        ProxyFeatures(kind=self.attacker_features, timesteps=tuple(self.attacker_timesteps), noise=self.attacker_noise,
                      calibration=self.attacker_calibration)  # ConfigError for an impossible combination
        if self.attacker_calibration != "none" and "log" in self.attacker_normalization:
            raise ConfigError(f"'attacker_calibration = {self.attacker_calibration}' gives signed features (LoRA "
                              f"minus base), which 'attacker_normalization = {self.attacker_normalization}' would take "
                              "the log of; use standardize (or none)")
