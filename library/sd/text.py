"""CLIP tokenizers built offline, and Stable Diffusion v1.x text conditioning.

Two concerns live here:

* **Building tokenizers without the Hub.** transformers 5's ``CLIPTokenizer(vocab=dict, merges=[tuples])`` is
  the constructor that works offline (``vocab_file=`` silently yields a 3-token vocabulary on
  transformers 5.23). The helpers below build the byte-level alphabet CLIP uses, turn
  OpenAI's BPE merge list into the real 49,408-token vocabulary, and (de)serialise a tokenizer as plain JSON
  so it can travel inside a single-file checkpoint's metadata.
* **Encoding prompts the way kohya's sd-scripts does for SD v1.x**, including ``clip_skip`` and the
  long-caption mode (``max_token_length`` 150 / 225), so LoRAs trained here see the same conditioning as the
  upstream SMP-LoRA code (which runs with ``--clip_skip 2 --max_token_length 225``).

Long-caption layout (kohya, SD v1): the caption is tokenized to ``max_token_length + 2`` ids (BOS, up to
``max_token_length`` tokens, EOS, padded with EOS because SD1's pad token *is* EOS). That sequence is cut into
``max_token_length / 75`` windows of 75 tokens; each window is re-wrapped as ``BOS + 75 tokens + EOS`` (77 ids)
and encoded on its own. The hidden states are then stitched back into one sequence of
``max_token_length + 2`` positions: the BOS state of the first window, the 75 inner states of every window,
and the EOS state of the last window. So 225 -> (B, 227, D), 150 -> (B, 152, D), and the default 77-token
window -> (B, 77, D): the length is always ``tokens + 2``.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from library.errors import ConfigError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Size of the real CLIP vocabulary and the number of merges OpenAI's BPE file contributes to it:
# 256 byte symbols + 256 end-of-word variants + 48,894 merges + 2 specials = 49,408.
CLIP_VOCAB_SIZE = 49408
_CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """CLIP/GPT-2's byte-level alphabet: a printable, non-space stand-in symbol for every byte 0..255.

    Printable Latin-1 bytes map to themselves; the rest are shifted to code points from 256 upwards. The dict's
    *insertion order* (printable bytes first, then the shifted ones) is the order of CLIP's first 256 vocabulary
    ids, which keeps ids identical to the real SD tokenizer ("!" is id 0, "a</w>" is id 320).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _base_symbols() -> list[str]:
    """CLIP's first 512 vocabulary entries: each byte symbol, then each with the end-of-word marker."""
    alphabet = list(byte_level_alphabet().values())
    return alphabet + [symbol + "</w>" for symbol in alphabet]


def small_clip_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level CLIP vocabulary with whole-word merges for ``words`` (about 520 tokens).

    Any text still tokenizes (unknown words fall back to single characters); each listed word becomes a
    single ``word</w>`` token through left-to-right merges. Words are lower-cased like CLIP's normaliser.
    """
    vocab = _base_symbols()
    seen = set(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        word = word.strip().lower()
        if not word:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        current = symbols[0]
        for symbol in symbols[1:]:
            merged = current + symbol
            if merged not in seen:
                merges.append((current, symbol))
                vocab.append(merged)
                seen.add(merged)
            current = merged
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(vocab)}, merges


def build_clip_tokenizer(
    vocab: dict[str, int], merges: Sequence[Sequence[str]], model_max_length: int = 77
) -> Any:
    """A ``CLIPTokenizer`` from an in-memory vocabulary and merge list (works offline)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[(str(a), str(b)) for a, b in merges],
        model_max_length=int(model_max_length),
    )


def clip_tokenizer_from_bpe_file(path: str | Path, model_max_length: int = 77) -> Any:
    """The real CLIP tokenizer (49,408 tokens) from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

    The file's first line is a version header; the next 48,894 lines are the merges in rank order. The vocabulary
    is the 512 base symbols, then one entry per merge, then the two specials, the order OpenAI's CLIP uses, so
    ids match the SD v1.x tokenizer.
    """
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _CLIP_NUM_MERGES] if line.strip()]
    vocab = _base_symbols() + ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return build_clip_tokenizer({t: i for i, t in enumerate(vocab)}, merges, model_max_length)


def tokenizer_merges(tokenizer: Any) -> list[tuple[str, str]]:
    """The BPE merges of a (fast) CLIP tokenizer, read from its serialised backend."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = []
    for merge in model.get("merges", []):
        # tokenizers writes pairs as ["a", "b"]; older files use "a b" strings.
        pair = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((pair[0], pair[1]))
    return merges


def tokenizer_to_dict(tokenizer: Any) -> dict[str, Any]:
    """A JSON-able description of a CLIP tokenizer: vocab, merges and window length."""
    return {
        "vocab": dict(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])),
        "merges": [list(pair) for pair in tokenizer_merges(tokenizer)],
        "model_max_length": int(tokenizer.model_max_length),
    }


def tokenizer_from_dict(data: dict[str, Any]) -> Any:
    """Inverse of :func:`tokenizer_to_dict`."""
    return build_clip_tokenizer(data["vocab"], data["merges"], data.get("model_max_length", 77))


def _window(tokenizer: Any) -> int:
    window = int(tokenizer.model_max_length)
    if window < 3 or window > 10_000:
        # transformers uses a huge sentinel when no length is configured; SD needs a real window.
        raise ConfigError(
            f"the tokenizer's model_max_length is {window}; a CLIP tokenizer for SD v1.x needs 77 "
            "(set model_max_length in tokenizer_config.json)"
        )
    return window


def tokenize(
    tokenizer: Any, prompts: Sequence[str], *, max_token_length: int | None = None
) -> torch.Tensor:
    """Token ids shaped (B, chunks, window): one 77-id window, or kohya's BOS/EOS-wrapped 75-token chunks.

    ``max_token_length`` None uses the tokenizer's own window (77 for SD). Otherwise it must be a multiple of
    ``window - 2`` (75, 150, 225, ...); see the module docstring for the layout.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    window = _window(tokenizer)
    inner = window - 2
    if max_token_length is None:
        ids = tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=window, return_tensors="pt"
        ).input_ids
        return ids.unsqueeze(1)
    if max_token_length <= 0 or max_token_length % inner != 0:
        raise ConfigError(
            f"max_token_length must be a multiple of {inner} (75, 150 or 225 for SD), got {max_token_length}"
        )
    total = max_token_length + 2
    ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=total, return_tensors="pt"
    ).input_ids
    bos, eos = ids[:, :1], ids[:, -1:]
    # The last id is EOS (the sequence was truncated) or padding, which is EOS for SD1's tokenizer.
    chunks = [
        torch.cat([bos, ids[:, start : start + inner], eos], dim=1) for start in range(1, total - 1, inner)
    ]
    return torch.stack(chunks, dim=1)


def _final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model`` wrapper); older versions nest it.
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


def check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    """One ConfigError line when the text encoder has fewer than ``clip_skip`` layers."""
    check_clip_skip_layers(int(text_encoder.config.num_hidden_layers), clip_skip)


def check_clip_skip_layers(num_layers: int, clip_skip: int) -> None:
    """One ConfigError line when a text encoder of ``num_layers`` layers has fewer than ``clip_skip``."""
    if not 1 <= clip_skip <= num_layers:
        raise ConfigError(f"clip_skip must be between 1 and {num_layers} for this text encoder, got {clip_skip}")


def encode_prompts(
    tokenizer: Any,
    text_encoder: Any,
    prompts: Sequence[str],
    *,
    max_token_length: int | None = None,
    clip_skip: int = 1,
) -> torch.Tensor:
    """SD v1.x conditioning for ``prompts``: hidden states shaped (B, tokens + 2, D).

    ``clip_skip=1`` is the last hidden state (after CLIP's final layer norm). ``clip_skip=k`` takes the
    k-th hidden state from the end and applies the final layer norm, as kohya and A1111 do (``2`` is the
    popular "penultimate layer" setting). Gradients flow if the caller enables them (text-encoder training).
    """
    check_clip_skip(text_encoder, clip_skip)
    ids = tokenize(tokenizer, prompts, max_token_length=max_token_length)
    batch, chunks, window = ids.shape
    flat = ids.reshape(batch * chunks, window).to(text_encoder.device)
    if clip_skip == 1:
        states = text_encoder(flat).last_hidden_state
    else:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-clip_skip]
        states = _final_layer_norm(text_encoder)(hidden)
    states = states.reshape(batch, chunks, window, states.shape[-1])
    if chunks == 1:
        return states[:, 0]
    # Stitch kohya-style: first BOS, the 75 inner positions of every chunk, last EOS.
    pieces = [states[:, 0, :1]] + [states[:, c, 1:-1] for c in range(chunks)] + [states[:, -1, -1:]]
    return torch.cat(pieces, dim=1)
