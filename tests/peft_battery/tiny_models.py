"""Local stand-ins for the tiny Hub models PEFT's decoder and encoder-decoder batteries load.

PEFT's `test_decoder_models.py` and `test_encoder_decoder_models.py` load small random models by Hub id
(`peft-internal-testing/tiny-random-OPTForCausalLM`, ...). The Hub is not reachable from the machines this project is
tested on, so each model the driver keeps is built here from a transformers config, with random weights (seeded), and
saved once per test session into a folder laid out as a Hub cache (`models--<org>--<name>/snapshots/<revision>/`,
`refs/main`). With the Hub offline and `huggingface_hub.constants.HF_HUB_CACHE` pointing at that folder, every
`from_pretrained(model_id)` of transformers and PEFT resolves the id to the local copy, and the model keeps its Hub id
as `name_or_path`, as a downloaded one would.

The architecture of each stand-in is the Hub model's (the class its id names). The sizes are small like those of
transformers' tiny test configurations (hidden size 16 or 32, two layers, four heads; OPT's feed-forward width is 4,
as PEFT's own tests say of that model), with vocabularies of 1,000 tokens (the batteries feed token ids below 10).
They are not copies of the Hub's files: the batteries check StocTuning on these architectures, not stored values.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

# A fixed, made-up commit hash for `refs/main`: the cache layout needs one.
REVISION = "0" * 40
VOCAB = 1000

# Hub id -> (transformers class name, config class name, config kwargs).
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": (
        "OPTForCausalLM",
        "OPTConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "word_embed_proj_dim": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 4,
            "max_position_embeddings": 100,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
        },
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": (
        "GPT2LMHeadModel",
        "GPT2Config",
        {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": 37,
            "n_positions": 512,
            "bos_token_id": VOCAB - 1,
            "eos_token_id": VOCAB - 1,
        },
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": (
        "LlamaForCausalLM",
        "LlamaConfig",
        {
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    ),
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": (
        "T5ForConditionalGeneration",
        "T5Config",
        {
            "vocab_size": VOCAB,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 37,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
    ),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": (
        "BartForConditionalGeneration",
        "BartConfig",
        {
            "vocab_size": VOCAB,
            "d_model": 16,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 4,
            "decoder_ffn_dim": 4,
            "max_position_embeddings": 100,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": 2,
        },
    ),
}


def hub_cache_folder(cache: Path, model_id: str) -> Path:
    """The folder of `model_id` in a Hub cache (`models--org--name`)."""
    return cache / ("models--" + model_id.replace("/", "--"))


def build_tiny_hub(cache: Path, model_ids=None, seed: int = 0) -> Path:
    """Build the stand-ins of `model_ids` (default: all) into the Hub cache `cache`; returns `cache`.

    The weights are drawn from a seeded generator of their own, so building leaves torch's global RNG as it was and
    the same ids always give the same weights.
    """
    for model_id in TINY_MODELS if model_ids is None else model_ids:
        model_cls, config_cls, kwargs = TINY_MODELS[model_id]
        folder = hub_cache_folder(cache, model_id)
        snapshot = folder / "snapshots" / REVISION
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
        model.save_pretrained(snapshot)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(REVISION, encoding="utf-8")
    return cache
