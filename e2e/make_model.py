"""Makes the tiny model `make e2e` serves with real SGLang: nothing is downloaded.

A `transformers` LlamaConfig (hidden 64, 2 layers, 4 heads) with random weights, and a
byte-level BPE tokenizer trained here with `tokenizers` on the bundled MT-bench questions
(vocab 2k), plus a ChatML-style chat template. The tokenizer adds no special tokens when encoding
(no post-processor), so the router's `--tokenizer` gives the engine's ids exactly.
Idempotent: an existing model folder with a config and a tokenizer is reused.

    .e2e/venv/bin/python e2e/make_model.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    """Training text: the bundled MT-bench questions (a fixed, checksummed file, so every
    clone trains the same tokenizer; English prompts, like the requests it will serve)."""
    lines = (ROOT / "data" / "traces" / "mtbench_question.jsonl").read_text().splitlines()
    return [turn for line in lines for turn in json.loads(line)["turns"]]


def make_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )
    return int(tok.get_vocab_size())


def make_model(out: Path, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    eos = SPECIALS.index("<|im_end|>")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=SPECIALS.index("<|endoftext|>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        print(f"e2e model: reusing {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    make_model(out, vocab)
    print(f"e2e model: wrote {out} (vocab {vocab})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
