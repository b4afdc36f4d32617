"""Tests for library.sd.text: offline CLIP tokenizers and SD v1.x prompt encoding (clip_skip, long captions)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from library.demo.tiny import build_tiny_stack  # noqa: E402
from library.errors import ConfigError  # noqa: E402
from library.sd.bundle import ModelBundle  # noqa: E402
from library.sd.text import (  # noqa: E402
    _CLIP_NUM_MERGES,
    CLIP_VOCAB_SIZE,
    byte_level_alphabet,
    clip_tokenizer_from_bpe_file,
    encode_prompts,
    small_clip_vocab,
    tokenize,
    tokenizer_from_dict,
    tokenizer_to_dict,
)

PROMPTS = ["a handwritten digit seven", "a photo of the number zero"]


@pytest.fixture(scope="session")
def tiny_text() -> ModelBundle:
    return build_tiny_stack(seed=0)


def test_byte_level_alphabet() -> None:
    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert alphabet[ord("a")] == "a" and alphabet[ord(" ")] == "Ġ"  # space becomes a visible symbol
    assert all(not symbol.isspace() for symbol in alphabet.values())
    assert list(alphabet.values())[0] == "!"  # CLIP's vocabulary order: printable bytes first


def test_small_vocab_whole_word_merges() -> None:
    vocab, merges = small_clip_vocab(["digit", "Seven"])
    assert vocab["digit</w>"] and vocab["seven</w>"]
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert all(isinstance(m, tuple) and len(m) == 2 for m in merges)


def test_tokenizer_round_trips(tiny_text: ModelBundle, tmp_path: Path) -> None:
    tokenizer = tiny_text.tokenizer
    text = "a handwritten digit seven"
    ids = tokenizer(text).input_ids
    assert len(ids) == 2 + 4  # BOS, four whole words, EOS
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
    unknown = "Zebra 42!"
    unknown_ids = tokenizer(unknown).input_ids
    # unknown words fall back to characters; CLIP splits digits and punctuation into their own tokens
    assert tokenizer.decode(unknown_ids, skip_special_tokens=True).replace(" ", "") == "zebra42!"

    rebuilt = tokenizer_from_dict(tokenizer_to_dict(tokenizer))
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    assert rebuilt(text).input_ids == ids and rebuilt(unknown).input_ids == unknown_ids

    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    assert reloaded(text).input_ids == ids and reloaded.model_max_length == 77


def test_bpe_file_vocab_order(tmp_path: Path) -> None:
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\nd i\ndi g\ndig i\ndigi t</w>\n")
    tokenizer = clip_tokenizer_from_bpe_file(path)
    vocab = tokenizer.get_vocab()
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["di"] == 512 and vocab["digit</w>"] == 515
    assert vocab["<|startoftext|>"] == 516 and vocab["<|endoftext|>"] == 517
    assert tokenizer("digit").input_ids == [516, 515, 517]
    assert tokenizer("a").input_ids[1] == 320  # "a</w>" has id 320 in the real CLIP vocabulary too


def test_default_window(tiny_text: ModelBundle) -> None:
    ids = tokenize(tiny_text.tokenizer, PROMPTS)
    assert ids.shape == (2, 1, 77)
    states = encode_prompts(tiny_text.tokenizer, tiny_text.text_encoder, PROMPTS)
    assert states.shape == (2, 77, 32)
    with torch.no_grad():
        expected = tiny_text.text_encoder(ids[:, 0]).last_hidden_state
    torch.testing.assert_close(states, expected)


def test_clip_skip_two_is_penultimate_layer_normed(tiny_text: ModelBundle) -> None:
    te = tiny_text.text_encoder
    last = encode_prompts(tiny_text.tokenizer, te, PROMPTS, clip_skip=1)
    skip = encode_prompts(tiny_text.tokenizer, te, PROMPTS, clip_skip=2)
    assert skip.shape == last.shape == (2, 77, 32)
    assert not torch.allclose(skip, last)
    ids = tokenize(tiny_text.tokenizer, PROMPTS)[:, 0]
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        expected = te.final_layer_norm(hidden[-2])
    torch.testing.assert_close(skip, expected)
    with pytest.raises(ConfigError, match="clip_skip"):
        encode_prompts(tiny_text.tokenizer, te, PROMPTS, clip_skip=3)  # the tiny encoder has 2 layers
    with pytest.raises(ConfigError, match="clip_skip"):
        encode_prompts(tiny_text.tokenizer, te, PROMPTS, clip_skip=0)


def test_long_caption_chunks(tiny_text: ModelBundle) -> None:
    tokenizer = tiny_text.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long_prompt = " ".join(["digit seven"] * 50)  # 100 word tokens: more than one 75-token window
    ids = tokenize(tokenizer, [PROMPTS[0], long_prompt], max_token_length=225)
    assert ids.shape == (2, 3, 77)
    assert (ids[:, :, 0] == bos).all() and (ids[:, :, -1] == eos).all()
    # the long caption continues into the second chunk instead of being cut at 75 tokens
    seven = tokenizer.convert_tokens_to_ids("seven</w>")
    assert (ids[1, 0, 1:76] != eos).all() and ids[1, 1, 1:26].eq(seven).sum() == 13
    assert (ids[1, 1, 26:] == eos).all() and (ids[1, 2, 1:] == eos).all()
    # a short caption's first chunk is exactly the default 77-token window
    assert torch.equal(ids[0, 0], tokenize(tokenizer, [PROMPTS[0]])[0, 0])


@pytest.mark.parametrize("max_len", [150, 225])
def test_long_caption_encoding_layout(tiny_text: ModelBundle, max_len: int) -> None:
    te = tiny_text.tokenizer, tiny_text.text_encoder
    states = encode_prompts(*te, PROMPTS, max_token_length=max_len)
    assert states.shape == (2, max_len + 2, 32)  # kohya: BOS + 75 per chunk + EOS
    default = encode_prompts(*te, PROMPTS)
    # chunk 0 of a short caption is the default window, so BOS + its 75 inner states agree
    torch.testing.assert_close(states[:, :76], default[:, :76])
    skip = encode_prompts(*te, PROMPTS, max_token_length=max_len, clip_skip=2)
    assert skip.shape == states.shape and not torch.allclose(skip, states)


def test_bad_max_token_length(tiny_text: ModelBundle) -> None:
    with pytest.raises(ConfigError, match="multiple of 75"):
        tokenize(tiny_text.tokenizer, PROMPTS, max_token_length=100)


def test_gradients_flow_when_enabled() -> None:
    bundle = build_tiny_stack(seed=0)
    bundle.text_encoder.requires_grad_(True)
    states = encode_prompts(bundle.tokenizer, bundle.text_encoder, PROMPTS, max_token_length=150, clip_skip=2)
    states.square().mean().backward()
    assert bundle.text_encoder.embeddings.token_embedding.weight.grad is not None


def _kohya_reference(tokenizer, text_encoder, prompts, max_len: int, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's SD1 long-caption conditioning built by hand: the caption's first ``max_len`` tokens, cut into 75-token
    windows (padded with EOS), each encoded as BOS + 75 + EOS; the stitched states keep the first window's BOS, the
    75 inner states of every window and the last window's EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    windows = []
    for prompt in prompts:
        tokens = tokenizer(prompt, add_special_tokens=False).input_ids[:max_len]
        tokens = tokens + [eos] * (max_len - len(tokens))
        windows.append([[bos] + tokens[i : i + 75] + [eos] for i in range(0, max_len, 75)])
    ids = torch.tensor(windows)
    with torch.no_grad():
        hidden = text_encoder(ids.flatten(0, 1), output_hidden_states=True).hidden_states[-clip_skip]
        states = text_encoder.final_layer_norm(hidden).unflatten(0, ids.shape[:2])
    inner = [states[:, c, 1:-1] for c in range(ids.shape[1])]
    return ids, torch.cat([states[:, 0, :1], *inner, states[:, -1, -1:]], dim=1)


@pytest.mark.parametrize(("max_len", "clip_skip"), [(150, 1), (225, 2)])
def test_long_caption_matches_kohya_by_hand(tiny_text: ModelBundle, max_len: int, clip_skip: int) -> None:
    # Guards the long-caption layout end to end: all max_len tokens of an over-long caption are kept (none lost to an
    # off-by-one in the 227-id tokenization, the last id is EOS even when truncated), and the stitched sequence ends
    # with the *last* window's EOS state, next to a short caption in the same batch.
    tokenizer, te = tiny_text.tokenizer, tiny_text.text_encoder
    long_prompt = " ".join(str(i % 10) for i in range(300))  # 300 single-digit tokens, longer than any window
    prompts = [PROMPTS[0], long_prompt]
    expected_ids, expected = _kohya_reference(tokenizer, te, prompts, max_len, clip_skip)
    assert torch.equal(tokenize(tokenizer, prompts, max_token_length=max_len), expected_ids)
    states = encode_prompts(tokenizer, te, prompts, max_token_length=max_len, clip_skip=clip_skip)
    assert states.shape == (2, max_len + 2, 32)
    torch.testing.assert_close(states, expected, rtol=0, atol=0)


def test_default_window_truncates_a_long_prompt(tiny_text: ModelBundle) -> None:
    # Without --max_token_length a caption longer than 75 tokens is cut to BOS + 75 + EOS (as CLIP does), not refused.
    tokenizer = tiny_text.tokenizer
    long_prompt = " ".join(str(i % 10) for i in range(100))
    ids = tokenize(tokenizer, [long_prompt, PROMPTS[0]])
    assert ids.shape == (2, 1, 77) and ids[0, 0, -1] == tokenizer.eos_token_id
    assert ids[0, 0, 1:76].tolist() == tokenizer(long_prompt, add_special_tokens=False).input_ids[:75]
    assert encode_prompts(tokenizer, tiny_text.text_encoder, [long_prompt]).shape == (1, 77, 32)


def test_tokenize_edge_inputs(tiny_text: ModelBundle) -> None:
    # A single string is one prompt (not one per character); max_token_length 0 and a tokenizer without a real
    # window (transformers' huge "no length" sentinel) are one ConfigError each, not a crash or a huge tensor.
    tokenizer = tiny_text.tokenizer
    assert torch.equal(tokenize(tokenizer, PROMPTS[0]), tokenize(tokenizer, [PROMPTS[0]]))
    with pytest.raises(ConfigError, match="multiple of 75"):
        tokenize(tokenizer, PROMPTS, max_token_length=0)
    unbounded = tokenizer_from_dict({**tokenizer_to_dict(tokenizer), "model_max_length": int(1e30)})
    with pytest.raises(ConfigError, match="model_max_length"):
        tokenize(unbounded, PROMPTS)


def test_a_full_bpe_file_gives_exactly_clips_vocabulary_size() -> None:
    """CLIP reads 48,894 of the file's merge lines; more would put BOS/EOS past its 49,408 embeddings."""
    assert 2 * 256 + _CLIP_NUM_MERGES + 2 == CLIP_VOCAB_SIZE == 49408


def test_a_tokenizer_dict_without_a_window_encodes_sd_windows(tiny_text: ModelBundle) -> None:
    """A tokenizer saved without model_max_length still encodes SD's 77-id windows, as the LoRA was trained on."""
    data = tokenizer_to_dict(tiny_text.tokenizer)
    del data["model_max_length"]
    assert tokenize(tokenizer_from_dict(data), PROMPTS).shape == (2, 1, 77)


def test_every_printable_byte_keeps_its_own_symbol_and_clips_id() -> None:
    """Ids must match the real SD tokenizer's: "~" is the last printable ASCII symbol (93), "Ā" the first shifted."""
    symbols = list(byte_level_alphabet().values())
    assert [symbols.index(c) for c in "~¡ÿĀ"] == [93, 94, 187, 188]


@pytest.mark.parametrize("max_len", [76, 151])
def test_max_token_length_one_past_a_window_is_refused(tiny_text: ModelBundle, max_len: int) -> None:
    """One token past a 75-token window leaves a ragged last chunk: a ConfigError, not a crash in torch.stack."""
    with pytest.raises(ConfigError, match="multiple of 75"):
        tokenize(tiny_text.tokenizer, PROMPTS, max_token_length=max_len)
