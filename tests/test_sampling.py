"""Prompt files (sd-scripts syntax) and training-time sample images."""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.sd.sampling import PromptSpec, parse_prompt_line, read_prompt_file
from library.train.config_scope import check_for_method


def test_prompt_options_are_parsed():
    spec = parse_prompt_line("a handwritten digit seven --n blurry, noisy --d 3 --s 12 --l 4.5 --w 64 --h 32")
    assert spec == PromptSpec("a handwritten digit seven", "blurry, noisy", 64, 32, 3, 12, 4.5)
    assert parse_prompt_line("plain prompt") == PromptSpec("plain prompt")
    # an empty --n is no negative prompt (sd-scripts drops it); it once swallowed the next option as its text
    assert parse_prompt_line("a cat --n --d 3 --s 5") == PromptSpec("a cat", seed=3, steps=5)
    assert parse_prompt_line("a cat --d 3 --n") == PromptSpec("a cat", seed=3)


def test_sd_scripts_prompt_files(tmp_path, capsys):
    """Options in any case (sd-scripts ignores case), --ss read and ignored with a warning, anything else refused,
    and sd-scripts' TOML / JSON prompt files refused instead of read line by line as prompts."""
    assert parse_prompt_line("a cat --N blurry --W 64 --ss euler_a --S 20") == PromptSpec(
        "a cat", "blurry", 64, None, None, 20)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --ss euler_a --s 20\n")
    assert read_prompt_file(prompts) == [PromptSpec("a cat", steps=20)]
    assert "--ss (sampler) ignored" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown prompt option --cn"):
        parse_prompt_line("a cat --cn canny")
    for suffix in (".toml", ".json"):
        other = tmp_path / f"prompts{suffix}"
        other.write_text("[prompt]\nwidth = 32\n")
        with pytest.raises(ConfigError, match="prompt files are not read; write one prompt per line"):
            read_prompt_file(other)


def test_bad_prompt_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        read_prompt_file(empty)
    bad = tmp_path / "bad.txt"
    bad.write_text("a digit --s many\n")
    with pytest.raises(ConfigError, match=r"bad.txt:1: option --s expects a int"):
        read_prompt_file(bad)


def test_training_writes_sample_grid(tiny_train_args, tmp_path):
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one --d 1\na handwritten digit two --s 3\n")
    # 24 members at batch 4 = 6 steps per epoch: one epoch ends inside the run, the second is cut short by
    # max_train_steps and samples at the run's end, as sd-scripts does
    args = tiny_train_args + ["--max_train_steps", "8", "--sample_prompts", str(prompts),
                              "--sample_every_n_epochs", "1", "--sample_steps", "2"]
    train(parse_config(TrainConfig, args), "lora")
    grid = tmp_path / "out" / "sample" / "lora_e000001.png"
    from PIL import Image

    assert Image.open(grid).size == (64, 32)  # two 32 px images side by side
    assert sorted(p.name for p in grid.parent.iterdir()) == ["lora_e000001.png", "lora_e000002.png"]
    # A last step that ran into the next epoch by accumulation (6 batches per epoch, 5 per step): its weights were
    # sampled at epoch 1's end; no second, identical grid for an epoch the run never had
    args = tiny_train_args + ["--max_train_epochs", "1", "--gradient_accumulation_steps", "5", "--sample_prompts",
                              str(prompts), "--sample_every_n_epochs", "1", "--sample_steps", "2",
                              "--output_dir", str(tmp_path / "acc")]
    train(parse_config(TrainConfig, args), "lora")
    assert sorted(p.name for p in (tmp_path / "acc" / "sample").iterdir()) == ["lora_e000001.png"]


def test_generation_encodes_prompts_as_training_does(monkeypatch):
    """With clip skip 1 and one window the images equal the pipeline's own encoding (the demo's numbers stay);
    clip skip and 225-token captions reach the UNet as training conditioned it, where the pipeline would not."""
    import numpy as np
    import torch

    from library.demo.tiny import build_tiny_stack
    from library.sd.sampling import build_pipeline, generate
    from library.sd.text import encode_prompts

    bundle = build_tiny_stack()
    pipe = build_pipeline(bundle)
    prompt = "a handwritten digit seven"
    ours = generate(pipe, [PromptSpec(prompt, "blurry")], resolution=32, steps=2, seed=5)[0]
    theirs = pipe(prompt, negative_prompt="blurry", height=32, width=32, num_inference_steps=2, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))

    long_prompt = " ".join(["a handwritten digit seven"] * 30)  # 120 words: past one 75-token window
    seen: list[tuple[int, ...]] = []
    original = pipe.__class__.__call__

    def spy(self, *args, **kwargs):
        seen.append(tuple(kwargs["prompt_embeds"].shape))
        embeds = encode_prompts(self.tokenizer, self.text_encoder, [long_prompt], max_token_length=225, clip_skip=2)
        assert torch.equal(kwargs["prompt_embeds"], embeds)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    generate(pipe, [PromptSpec(long_prompt)], resolution=32, steps=1, clip_skip=2, max_token_length=225)
    assert seen == [(1, 227, bundle.text_encoder.config.hidden_size)]


@pytest.mark.parametrize("line, message", [
    ("a digit --w 30", "--w must be a positive multiple of 8"),  # the pipeline refused it after an epoch
    ("a digit --h -32", "--h must be a positive multiple of 8"),
    ("a digit --s 0", "--s must be at least 1"),  # was silently the default
    ("a digit --l nan", "--l must be a finite guidance scale"),
    ("a digit --d --s 4", "option --d has no value"),
    ("a digit --w 0", "--w must be a positive multiple of 8"),
    ("a digit --s --d 4", "option --s has no value"),  # not "expects a int, got ''"
])
def test_prompt_option_values_are_checked_when_the_file_is_read(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_prompt_line(line, "p.txt:1")


def test_a_grid_of_different_sizes_crops_no_image(tmp_path):
    from PIL import Image

    from library.sd.sampling import save_grid

    small, large = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    grid = Image.open(save_grid([small, large], tmp_path / "g.png"))
    assert grid.size == (128, 48)
    assert grid.crop((64, 0, 128, 48)).tobytes() == large.tobytes()  # the whole of the larger image


def _sampling_run(tiny_train_args, tmp_path, name, extra):
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one --d 1\na handwritten digit two --s 2 --w 48\n")
    args = tiny_train_args + ["--max_train_steps", "7", "--sample_steps", "2", "--output_dir", str(tmp_path / name)]
    sampling = ["--sample_prompts", str(prompts), "--sample_every_n_epochs", "1"]
    return train(parse_config(TrainConfig, args + extra + (sampling if name.startswith("s") else [])), "lora")


def test_sampling_under_mixed_precision_and_with_lora_dropout_changes_no_weight(tiny_train_args, tmp_path):
    """bf16 autocast casts the frozen UNet and text encoder while the VAE stays fp32: the pipeline crashed in the
    VAE. With LoRA dropout, the samples drew their masks from the RNG training goes on with: other weights."""
    from PIL import Image
    from safetensors.torch import load_file

    for extra in (["--mixed_precision", "bf16"], ["--network_dropout", "0.1"]):
        sampled = _sampling_run(tiny_train_args, tmp_path, f"s{len(extra[1])}", extra)
        assert Image.open(tmp_path / f"s{len(extra[1])}" / "sample" / "lora_e000001.png").size == (96, 32)
        plain = _sampling_run(tiny_train_args, tmp_path, f"p{len(extra[1])}", extra)
        a, b = load_file(sampled.weights_path), load_file(plain.weights_path)
        assert all(torch.equal(a[k], b[k]) for k in a), extra


@pytest.mark.parametrize("flags", [["--sample_prompts", "p.txt"], ["--sample_every_n_epochs", "1"]])
def test_a_sampling_flag_without_its_partner_warns(flags, capsys):
    from library.config import parse_config
    from library.train.config import TrainConfig

    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s"] + flags)
    check_for_method(config, "lora")
    assert "no samples are drawn: --sample_prompts and --sample_every_n_epochs (or --sample_at_first) go together" \
        in capsys.readouterr().err


def test_sample_at_first_shows_the_base_model_then_a_resumed_runs_weights_by_step(tiny_model_dir, tiny_train_args,
                                                                                  tmp_path):
    """sd-scripts' --sample_at_first: before step 0 the LoRA adds exactly zero, so the grid is the base model's
    images; a resumed run samples its state's weights under the step's name (never over an epoch's grid)."""
    import numpy as np
    from PIL import Image

    from library.config import parse_config
    from library.sd.loading import load_sd_model
    from library.sd.sampling import build_pipeline, generate
    from library.train.config import TrainConfig
    from library.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one --d 1\n")
    args = tiny_train_args + ["--sample_prompts", str(prompts), "--sample_at_first", "--sample_steps", "2"]
    train(parse_config(TrainConfig, args + ["--max_train_steps", "2", "--save_state"]), "lora")
    samples = tmp_path / "out" / "sample"
    assert sorted(p.name for p in samples.iterdir()) == ["lora_e000000.png"]  # no --sample_every_n_epochs
    base = generate(build_pipeline(load_sd_model(tiny_model_dir)), read_prompt_file(str(prompts)), resolution=32,
                    steps=2, seed=TrainConfig.seed)
    assert np.array_equal(np.asarray(Image.open(samples / "lora_e000000.png")), np.asarray(base[0]))

    train(parse_config(TrainConfig, args + ["--max_train_steps", "3", "--resume", "latest"]), "lora")
    assert sorted(p.name for p in samples.iterdir()) == ["lora_000002.png", "lora_e000000.png"]


def test_each_prompt_gets_its_own_seed_steps_scale_and_the_named_sampler(monkeypatch):
    """A prompt's --d / --s / --l / --w / --h reach the pipeline, else the run's defaults; image i without --d is seed + i
    (a grid of several prompts is not one seed repeated); --sample_sampler picks diffusers' scheduler of that name."""
    import types

    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    from PIL import Image

    from library.demo.tiny import build_tiny_stack
    from library.sd.sampling import build_pipeline, generate

    bundle = build_tiny_stack()
    assert type(build_pipeline(bundle, "ddim").scheduler) is DDIMScheduler
    assert type(build_pipeline(bundle, "euler").scheduler) is EulerDiscreteScheduler
    pipe = build_pipeline(bundle)
    seen = []

    def fake(self, **kwargs):
        seen.append((kwargs["generator"].initial_seed(), kwargs["num_inference_steps"], kwargs["guidance_scale"],
                     kwargs["width"], kwargs["height"]))
        return types.SimpleNamespace(images=[Image.new("RGB", (8, 8))])

    monkeypatch.setattr(type(pipe), "__call__", fake)
    specs = [PromptSpec("one"), PromptSpec("two", width=48, height=16, seed=42, steps=3, guidance_scale=2.0),
             PromptSpec("three")]
    generate(pipe, specs, resolution=32, steps=2, guidance_scale=7.5, seed=5)
    assert seen == [(5, 2, 7.5, 32, 32), (42, 3, 2.0, 48, 16), (7, 2, 7.5, 32, 32)]


def test_a_grid_holds_every_image(tmp_path):
    # Three samples in two columns need two rows; rounding the rows down would leave the third off the PNG. The
    # images are wider than tall, so a row stepped by the width would too.
    from PIL import Image

    from library.sd.sampling import save_grid

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = Image.open(save_grid([Image.new("RGB", (8, 4), c) for c in colours], tmp_path / "g.png"))
    assert grid.size == (16, 8)  # 2 columns, 2 rows: the third image starts the second row
    assert [grid.getpixel(xy) for xy in ((0, 0), (8, 0), (0, 4))] == colours


def test_decoding_divides_the_latents_by_the_vaes_scaling_factor():
    """Latents live in VAE space times scaling_factor (0.18215 for SD v1.x); the sample's decode undoes it in the
    VAE's own dtype (a multiplication here went unnoticed: every sample would be decoded 1/0.18215^2 too loud)."""
    from types import SimpleNamespace

    from library.sd.sampling import _decode

    seen = {}

    def decode(latents):
        seen["latents"] = latents
        return SimpleNamespace(sample=latents)

    vae = SimpleNamespace(dtype=torch.float64, config=SimpleNamespace(scaling_factor=0.25), decode=decode)
    pipe = SimpleNamespace(vae=vae, image_processor=SimpleNamespace(postprocess=lambda x, output_type: [x]))
    latents = torch.tensor([[1.0, -2.0]])
    assert torch.equal(_decode(pipe, latents), torch.tensor([[4.0, -8.0]], dtype=torch.float64))
    assert seen["latents"].dtype == torch.float64


def test_a_run_cut_short_in_its_first_epoch_samples_it_with_the_runs_seed(tiny_model_dir, tiny_train_args, tmp_path):
    """A prompt without --d draws from --seed (a grid is reproducible per run); an epoch cut short is due at 1 too."""
    import numpy as np
    from PIL import Image

    from library.config import parse_config
    from library.sd.loading import load_sd_model
    from library.sd.sampling import build_pipeline, generate
    from library.train.config import TrainConfig
    from library.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit one\n")
    train(parse_config(TrainConfig, tiny_train_args + [
        "--sample_prompts", str(prompts), "--sample_at_first", "--sample_every_n_epochs", "1", "--sample_steps", "2",
        "--seed", "3", "--max_train_steps", "2"]), "lora")  # 6 steps per epoch: the run ends inside epoch 1
    samples = tmp_path / "out" / "sample"
    assert sorted(p.name for p in samples.iterdir()) == ["lora_e000000.png", "lora_e000001.png"]
    base = generate(build_pipeline(load_sd_model(tiny_model_dir)), read_prompt_file(str(prompts)), resolution=32,
                    steps=2, seed=3)
    assert np.array_equal(np.asarray(Image.open(samples / "lora_e000000.png")), np.asarray(base[0]))


def test_a_bom_indented_comments_and_an_upper_case_sampler_option_read_as_intended(tmp_path, capsys):
    """Windows editors start the file with a BOM and users indent comments: neither may become a prompt."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\n  # an indented comment\na cat --SS euler_a\n", encoding="utf-8-sig")
    assert read_prompt_file(prompts) == [PromptSpec("a cat")]
    assert "--SS (sampler) ignored" in capsys.readouterr().err  # --ss in any case is the sampler, warned about


def test_an_upper_case_toml_suffix_is_still_refused(tmp_path):
    """PROMPTS.TOML is sd-scripts' TOML format all the same: refused, not read line by line as prompts."""
    other = tmp_path / "PROMPTS.TOML"
    other.write_text("[prompt]\nwidth = 32\n")
    with pytest.raises(ConfigError, match="prompt files are not read"):
        read_prompt_file(other)


def test_seed_zero_and_any_multiple_of_8_pixels_are_accepted():
    """The pipeline takes seed 0 and sizes in steps of 8 px: refusing them would reject valid prompt files."""
    assert parse_prompt_line("a digit --d 0 --w 40 --h 8") == PromptSpec("a digit", width=40, height=8, seed=0)
