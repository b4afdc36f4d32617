"""sd-scripts' (and diffusers' example scripts') flags and TOML keys that this toolkit does not take, and what a
kohya or diffusers user does instead.

A kohya user's command line or GUI-written TOML names options we do not have (memory savers, SD 2.x switches,
noise tricks, augmentation, bucketing). Instead of "unknown key" (or a "did you mean" pointing at an unrelated
flag), each gets its own advice. In a TOML file, a key at a value that changes nothing here (``v2 = false``,
``xformers = true``: diffusers already uses PyTorch's fused attention, ``noise_offset = 0``, ...) is accepted
with one ``warning:`` line, so such configs load; any other value is refused with the advice. On the command
line every such flag is refused with its advice (a launch script is quick to edit).
"""

from __future__ import annotations

from typing import Any

from library.foreign_keys import VAE_FOREIGN_KEY, ForeignKey


def _always(_: Any) -> bool:
    return True


def _false(value: Any) -> bool:
    return value is False


def _unset(value: Any) -> bool:
    return value in ("", None)


def _zero(value: Any) -> bool:
    return value in (0, 0.0, None)


_SD1_ONLY = "smp-lora trains SD v1.x (epsilon prediction) only; drop it"
_FUSED_ATTENTION = "diffusers already uses PyTorch's fused attention (SDPA); drop it"
_PLAIN_OBJECTIVE = ("not supported: the objectives (paper Eq. 1, 6, 10) use the plain epsilon MSE, which the attack "
                    "suite's losses assume too; drop it")
_NO_AUGMENTATION = ("not supported: images are centre-cropped squares at --resolution with no augmentation "
                    "(the latents are cached once); drop it")
_IN_MEMORY = "not needed: latents are cached and served from memory, without data-loader workers; drop it"
_HF_DATASET = ("images are local files: save the dataset as an imagefolder (images + metadata.jsonl) and make a "
               "split manifest of it (scripts/make_split.py --caption_column NAME; --split_manifest)")
_CAPTION_AS_IS = ("not supported: a caption is used as its file holds it (first non-blank line; --shuffle_caption and "
                  "--keep_tokens only reorder its comma-separated tags); edit the caption files instead")

_NO_UPLOAD = ("not supported: nothing is uploaded; upload the saved .safetensors yourself (a LoRA trained on "
              "private images: mind its evaluate_mia.py report first)")
_NO_DEEPSPEED = ("not supported: DeepSpeed is not used (an SD v1.x LoRA fits one GPU; several GPUs: accelerate "
                 "launch --multi_gpu); drop it")
_RESUME = "use --resume (a state continues at its step, with its data order and noise); drop it"
_NO_VALIDATION = ("not supported: the held-out images are the split's non-members, which evaluate_mia.py measures "
                  "(their loss is the loss attack's score); drop it")
_OPTIMIZERS = "not supported: use --optimizer_type AdamW or AdamW8bit"

SD_SCRIPTS_KEYS: dict[str, ForeignKey] = {
    "v2": ForeignKey(_SD1_ONLY, _false),
    "v_parameterization": ForeignKey(_SD1_ONLY, _false),
    "sdxl": ForeignKey(_SD1_ONLY, _false),
    "xformers": ForeignKey(_FUSED_ATTENTION, _always),
    "sdpa": ForeignKey(_FUSED_ATTENTION, _always),
    "mem_eff_attn": ForeignKey(_FUSED_ATTENTION, _always),
    "lowram": ForeignKey("not needed; drop it", _always),
    "highvram": ForeignKey("not needed; drop it", _always),
    "ddp_timeout": ForeignKey("not supported (accelerate's default timeout applies); drop it", _always),
    "max_data_loader_n_workers": ForeignKey(_IN_MEMORY, _always),
    "persistent_data_loader_workers": ForeignKey(_IN_MEMORY, _always),
    "full_fp16": ForeignKey("use --mixed_precision fp16 (LoRA weights stay fp32)", _false),
    "full_bf16": ForeignKey("use --mixed_precision bf16 (LoRA weights stay fp32)", _false),
    "save_model_as": ForeignKey("LoRA files are always written as .safetensors; drop it",
                                lambda v: v == "safetensors"),
    "log_with": ForeignKey("tensorboard logs are written when --logging_dir is given; drop it",
                           lambda v: v == "tensorboard"),
    "log_prefix": ForeignKey("each run logs into <logging_dir>/<output_name>-<timestamp>; drop it"),
    "noise_offset": ForeignKey(_PLAIN_OBJECTIVE, _zero),
    "multires_noise_iterations": ForeignKey(_PLAIN_OBJECTIVE, _zero),
    "multires_noise_discount": ForeignKey(_PLAIN_OBJECTIVE, _always),
    "adaptive_noise_scale": ForeignKey(_PLAIN_OBJECTIVE, _zero),
    "ip_noise_gamma": ForeignKey(_PLAIN_OBJECTIVE, _zero),
    "min_snr_gamma": ForeignKey(_PLAIN_OBJECTIVE, _zero),
    "scale_v_pred_loss_like_noise_pred": ForeignKey(_SD1_ONLY, _false),
    "debiased_estimation_loss": ForeignKey(_PLAIN_OBJECTIVE, _false),
    "caption_dropout_rate": ForeignKey("not supported: every step uses the image's caption; drop it", _zero),
    "caption_dropout_every_n_epochs": ForeignKey("not supported: every step uses the image's caption", _zero),
    "caption_tag_dropout_rate": ForeignKey("not supported: every step uses the image's caption", _zero),
    "color_aug": ForeignKey(_NO_AUGMENTATION, _false),
    "flip_aug": ForeignKey(_NO_AUGMENTATION, _false),
    "random_crop": ForeignKey(_NO_AUGMENTATION, _false),
    # The kohya_ss GUI writes enable_bucket = true by default: loaded, with a warning of what happens instead
    "enable_bucket": ForeignKey("no aspect-ratio buckets: images are centre-cropped squares at --resolution", _always),
    "min_bucket_reso": ForeignKey("no aspect-ratio buckets: drop it", _always),
    "max_bucket_reso": ForeignKey("no aspect-ratio buckets: drop it", _always),
    "bucket_reso_steps": ForeignKey("no aspect-ratio buckets: drop it", _always),
    "bucket_no_upscale": ForeignKey("no aspect-ratio buckets: drop it", _always),
    "optimizer_args": ForeignKey("not supported: AdamW takes --weight_decay only", lambda v: v in ([], "", None)),
    "lr_scheduler_num_cycles": ForeignKey("not supported (cosine runs one cycle)", lambda v: v in (1, None)),
    "lr_scheduler_power": ForeignKey("not supported (linear decays linearly)", lambda v: v in (1, 1.0, None)),
    "sample_every_n_steps": ForeignKey("use --sample_every_n_epochs"),
    "sample_sampler": ForeignKey("training-time samples use one sampler (DDIM); drop it", _always),
    "network_train_text_encoder_only": ForeignKey("use --unet_lr 0 (only the text-encoder LoRA trains)", _false),
    "reg_data_dir": ForeignKey("DreamBooth's class images: --with_prior_preservation --class_data_dir DIR (the "
                               "same folder: its <repeats>_<class> subfolders are read) --num_class_images N"),
    "dataset_config": ForeignKey("give the images as a split manifest (scripts/make_split.py; --split_manifest) "
                                 "or, for plain LoRA, a kohya folder (--train_data_dir)"),
    "datasets": ForeignKey("this is an sd-scripts dataset config: give the images as a split manifest "
                           "(scripts/make_split.py; --split_manifest) or, for plain LoRA, a kohya folder "
                           "(--train_data_dir)"),
    "in_json": ForeignKey("give the images as a split manifest (scripts/make_split.py) or a kohya folder"),
    # keys of recent sd-scripts / kohya_ss GUI configs, harmless at their defaults
    "loss_type": ForeignKey(_PLAIN_OBJECTIVE, lambda v: v == "l2"),
    "huber_c": ForeignKey(_PLAIN_OBJECTIVE, _always),  # used by loss_type huber / smooth_l1 only
    "huber_schedule": ForeignKey(_PLAIN_OBJECTIVE, _always),
    "noise_offset_type": ForeignKey(_PLAIN_OBJECTIVE, _always),  # the kind of noise_offset, which is refused
    "zero_terminal_snr": ForeignKey(_PLAIN_OBJECTIVE, _false),
    "masked_loss": ForeignKey("not supported: the loss covers the whole latent; drop it", _false),
    "scale_weight_norms": ForeignKey("not supported (max-norm regularisation would change what the privacy "
                                     "objective trains); drop it", _zero),
    "fp8_base": ForeignKey("not supported: use --mixed_precision fp16 or bf16", _false),
    "dynamo_backend": ForeignKey("torch.compile is not used here; drop it", lambda v: str(v).lower() in ("no", "")),
    "lr_scheduler_args": ForeignKey("not supported: the schedulers take --lr_warmup_steps only",
                                    lambda v: v in ([], "", None)),
    "save_state_on_train_end": ForeignKey("use --save_state (it also saves the final state)", _false),
    # sd-scripts' metadata flags that describe other kinds of files, or could publish a training image
    "metadata_thumbnail": ForeignKey("not supported: a thumbnail in the saved file's metadata would publish an "
                                     "image, often a training one, with every copy of the LoRA; drop it", _unset),
    "metadata_merged_from": ForeignKey("for merged models only: a trained file has no merge sources; drop it", _unset),
    "metadata_preprocessor": ForeignKey("for ControlNet-style models only; drop it", _unset),
    "metadata_is_negative_embedding": ForeignKey("for textual-inversion embeddings only; drop it", _unset),
    "wandb_api_key": ForeignKey("wandb is not used (tensorboard logs with --logging_dir); drop it", _always),
    "wandb_run_name": ForeignKey("wandb is not used (tensorboard logs with --logging_dir); drop it", _always),
    "no_half_vae": ForeignKey("the VAE always runs in fp32 here (what --no_half_vae asks for); drop it", _always),
    "vae": VAE_FOREIGN_KEY,
    "no_metadata": ForeignKey("not supported: the LoRA's metadata records what evaluate_mia.py checks (split, base "
                              "model, conditioning); it never holds paths or captions", _false),
    "weighted_captions": ForeignKey("not supported: captions are read as plain text; drop it", _false),
    "debug_dataset": ForeignKey("use --dry_run (it checks model, data and config, trains nothing)", _false),
    "skip_cache_check": ForeignKey("not needed: the latent cache is keyed by content; drop it", _always),
    "console_log_level": ForeignKey("not supported; drop it", _always),
    "console_log_file": ForeignKey("not supported; drop it", _always),
    "console_log_simple": ForeignKey("not supported; drop it", _always),
    "epoch": ForeignKey("the kohya_ss GUI's name for sd-scripts' max_train_epochs: use max_train_epochs"),
    # caption handling and text-encoder caching of sd-scripts' dataset options
    "cache_text_encoder_outputs": ForeignKey("not needed: a frozen text encoder's outputs are cached per caption "
                                             "already (not while it trains or captions are shuffled); drop it", _false),
    "cache_text_encoder_outputs_to_disk": ForeignKey("not supported: text-encoder outputs are cached in memory; "
                                                     "drop it", _false),
    "keep_tokens_separator": ForeignKey("not supported: --keep_tokens N keeps the caption's first N comma-separated "
                                        "tags in place; drop it", _unset),
    "caption_prefix": ForeignKey(_CAPTION_AS_IS, _unset),
    "caption_suffix": ForeignKey(_CAPTION_AS_IS, _unset),
    "caption_separator": ForeignKey("not supported: tags are separated by commas (--shuffle_caption, --keep_tokens); "
                                    "drop it", lambda v: v in (",", None)),
    "secondary_separator": ForeignKey(_CAPTION_AS_IS, _unset),
    "enable_wildcard": ForeignKey(_CAPTION_AS_IS, _false),
    "token_warmup_min": ForeignKey("not supported: every step uses the whole caption; drop it",
                                   lambda v: v in (1, None)),
    "token_warmup_step": ForeignKey("not supported: every step uses the whole caption; drop it", _zero),
    "no_token_padding": ForeignKey("not supported: captions are padded to the token length, as SD v1.x was "
                                   "trained; drop it", _false),
    # sd-scripts' newer options (2025-26): uploads, DeepSpeed, validation, schedulers and optimisers by class name
    **dict.fromkeys(("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                     "huggingface_repo_visibility"), ForeignKey(_NO_UPLOAD, _unset)),
    **dict.fromkeys(("save_state_to_huggingface", "resume_from_huggingface", "async_upload"),
                    ForeignKey(_NO_UPLOAD, _false)),
    "deepspeed": ForeignKey(_NO_DEEPSPEED, _false),
    # what configures DeepSpeed changes nothing without it
    **dict.fromkeys(("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                     "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                     "fp16_master_weights_and_gradients"), ForeignKey(_NO_DEEPSPEED, _always)),
    **dict.fromkeys(("ddp_gradient_as_bucket_view", "ddp_static_graph"),
                    ForeignKey("not needed: gradients are all-reduced by the training loop itself; drop it", _always)),
    "torch_compile": ForeignKey("torch.compile is not used here; drop it", _false),
    **dict.fromkeys(("initial_epoch", "initial_step"), ForeignKey(_RESUME, _unset)),
    "skip_until_initial_step": ForeignKey(_RESUME, _false),
    **dict.fromkeys(("validation_split", "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                     "validation_seed"), ForeignKey(_NO_VALIDATION, _zero)),
    "lr_scheduler_type": ForeignKey("not supported: a config never names code to import; use --lr_scheduler "
                                    "(constant, constant_with_warmup, cosine, linear)", _unset),
    **dict.fromkeys(("lr_decay_steps", "lr_scheduler_timescale", "lr_scheduler_min_lr_ratio"),
                    ForeignKey("not supported: the schedulers take --lr_warmup_steps only", _zero)),
    "optimizer_schedulefree_wrapper": ForeignKey(_OPTIMIZERS, _false),
    "schedulefree_wrapper_args": ForeignKey(_OPTIMIZERS, lambda v: v in ([], "", None)),
    "use_lion_optimizer": ForeignKey(_OPTIMIZERS, _false),
    "fused_backward_pass": ForeignKey("not supported: gradients are gathered for the privacy objective (and "
                                      "clipped together) before the step; drop it", _false),
    "blocks_to_swap": ForeignKey("not needed for SD v1.x (use --gradient_checkpointing to save memory); drop it",
                                 _zero),
    "cpu_offload_checkpointing": ForeignKey("not needed for SD v1.x (use --gradient_checkpointing); drop it", _false),
    "fp8_base_unet": ForeignKey("not supported: use --mixed_precision fp16 or bf16", _false),
    **dict.fromkeys(("ip_noise_gamma_random_strength", "noise_offset_random_strength"),
                    ForeignKey(_PLAIN_OBJECTIVE, _false)),
    "huber_scale": ForeignKey(_PLAIN_OBJECTIVE, _always),  # acts with loss_type = 'huber' only, which is refused
    # SD3 / FLUX timestep sampling: only those scripts read them
    **dict.fromkeys(("weighting_scheme", "logit_mean", "logit_std", "mode_scale"), ForeignKey(_SD1_ONLY, _always)),
    "alpha_mask": ForeignKey("not supported: the loss covers the whole latent; drop it", _false),
    "face_crop_aug_range": ForeignKey(_NO_AUGMENTATION, _unset),
    "resize_interpolation": ForeignKey("not supported: images are resized with Lanczos (PIL) before the centre "
                                       "crop; drop it", _unset),
    "caption_extention": ForeignKey("sd-scripts' old spelling: use --caption_extension"),
    "dataset_repeats": ForeignKey("repeats come from kohya folder names (10_name) or the split manifest; drop it",
                                  lambda v: v in (1, None)),
    **dict.fromkeys(("base_weights", "base_weights_multiplier"),
                    ForeignKey("not supported: merge those LoRAs into a base model first and train on that "
                               "(--pretrained_model_name_or_path), which evaluate_mia.py then takes too", _unset)),
    "conditioning_data_dir": ForeignKey("ControlNet training is not supported; drop it", _unset),
    **dict.fromkeys(("log_tracker_name", "log_tracker_config"),
                    ForeignKey("tensorboard logs are written when --logging_dir is given; drop it", _unset)),
    "log_config": ForeignKey("the run's settings are in <output_name>.json beside the LoRA; drop it", _false),
    "output_config": ForeignKey("not supported: the run's settings are in <output_name>.json beside the LoRA; "
                                "drop it", _false),
    "text_encoder_batch_size": ForeignKey("not needed: captions are encoded with their batch; drop it", _always),
    "tokenizer_cache_dir": ForeignKey("tokenizers load offline from the model folder, or --tokenizer_path", _unset),
    "disable_mmap_load_safetensors": ForeignKey("not needed; drop it", _always),
    "save_n_epoch_ratio": ForeignKey("use --save_every_n_epochs", _unset),
    "use_safetensors": ForeignKey("files are always written as .safetensors; drop it", _always),
    # flags of diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py that have a name of ours
    "center_crop": ForeignKey("images are always centre-cropped squares at --resolution (what --center_crop asks "
                              "for); drop it", lambda v: v is True),
    "random_flip": ForeignKey(_NO_AUGMENTATION, _false),
    "resume_from_checkpoint": ForeignKey("use --resume (a state folder, or latest: the newest state of "
                                         "--output_dir)"),
    "checkpointing_steps": ForeignKey("use --save_every_n_steps N --save_state (the LoRA and the training state)"),
    "rank": ForeignKey("use --network_dim (and --network_alpha)"),
    "caption_column": ForeignKey("captions are chosen when the split is made: scripts/make_split.py "
                                 "--caption_column NAME (for a metadata.jsonl folder)"),
    "image_column": ForeignKey(_HF_DATASET),
    "dataset_name": ForeignKey(_HF_DATASET),
    "validation_prompt": ForeignKey("use --sample_prompts FILE --sample_every_n_epochs N"),
    "report_to": ForeignKey("tensorboard logs are written when --logging_dir is given; drop it",
                            lambda v: v == "tensorboard"),
    "instance_prompt": ForeignKey("the instance prompt is each member's caption: write it into the caption files "
                                  "('a photo of sks dog') before making the split, and name the identifier with "
                                  "--instance_token sks"),
    "instance_data_dir": ForeignKey("give the instance images as a split manifest (scripts/make_split.py; "
                                    "--split_manifest), which MP/SMP-LoRA need, or for plain LoRA a folder "
                                    "(--train_data_dir)"),
    "sample_batch_size": ForeignKey("class images are generated one at a time (seeded per image); drop it",
                                    _always),
    "prior_generation_precision": ForeignKey("class images are generated under --mixed_precision; drop it",
                                             _always),
    "allow_tf32": ForeignKey("not supported: matmuls run in full fp32 unless --mixed_precision; drop it", _false),
    "scale_lr": ForeignKey("not supported: the learning rate is used as given; drop it", _false),
    "use_8bit_adam": ForeignKey("use --optimizer_type AdamW8bit", _false),
    "checkpoints_total_limit": ForeignKey("use --save_last_n_steps S, a span of steps as in sd-scripts (N x "
                                          "--save_every_n_steps keeps N checkpoints; --save_last_n_steps_state "
                                          "likewise for states)"),
    "snr_gamma": ForeignKey(_PLAIN_OBJECTIVE, lambda v: v in (None, 0, 0.0)),
    "enable_xformers_memory_efficient_attention": ForeignKey(_FUSED_ATTENTION, _always),
    "skip_save_text_encoder": ForeignKey("a trained text encoder is always saved with the UNet (evaluate_mia.py "
                                         "audits the pair); drop it"),
}


__all__ = ["ForeignKey", "SD_SCRIPTS_KEYS"]
