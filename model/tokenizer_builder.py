"""Build a small byte-level BPE tokenizer locally, with no downloads.

:func:`build_tokenizer` trains a byte-level BPE (the GPT-2 / Llama-3 / Qwen style) on
a built-in English-ish corpus generated in code from a fixed word list, so the result
is the same on every machine for the same ``vocab_size``:

* ids 0, 1, 2 are the special tokens ``<unk>``, ``<s>`` (BOS) and ``</s>`` (EOS);
* then the 256 byte symbols, then the learnt merges;
* if the trainer cannot reach ``vocab_size`` (the corpus is only a few KB, so it
  runs out of pairs worth merging at about a thousand tokens) the remaining ids
  are filled with special tokens ``<extra_N>`` so that *every* id below
  ``vocab_size`` exists and decodes.

The tokenizer prepends ``<s>`` when encoding with special tokens (as the Llama and
Mixtral tokenizers do) and decodes byte-exactly (``decode(encode(t).ids) == t`` with
``skip_special_tokens=True``).

:func:`save_tokenizer_files` writes ``tokenizer.json``, ``tokenizer_config.json``
(``"tokenizer_class": "PreTrainedTokenizerFast"``) and ``special_tokens_map.json``
into a checkpoint directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
MAX_VOCAB_SIZE = 1 << 20

_WORDS = """
the of and to in is was for on that with as by at from it his an were are which this be or
has had not but first one their its new after who they have her she two been other when there
all during into school time may years more most only over city some world would where later up
such used many can state about national out known university united then made
model expert router token layer attention cluster server request batch cache memory shard
weight tensor gradient vector matrix kernel device network latency throughput queue worker
mixture sparse dense gate score balance load capacity compute parallel pipeline stream
language sentence word letter number question answer story river mountain garden window
morning evening summer winter music paper market people family friend teacher student
quick brown fox jumps lazy dog bright green small large ancient modern simple careful
running writing reading building moving thinking learning serving routing scaling
however therefore because although while before between against without within
""".split()
_PUNCT = (".", ".", ".", ",", ",", "?", "!", ";", ":")
_EXTRA_TEXT = (
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1e-5 0x1f.\n"
    "Code: def f(x): return x * 2  # comment\n"
    "for i in range(10): print(i, i ** 2)\n"
    "{\"key\": [1, 2, 3], \"name\": \"value\"} <tag attr='v'>text</tag>\n"
    "Unicode: café naïve résumé Straße über 東京 こんにちは 你好 Привет 🙂\n"
)


def builtin_corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """A deterministic English-ish corpus (a few KB): sentences of words from a fixed list."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_sentences):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    lines.extend(_EXTRA_TEXT.splitlines())
    return lines


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly ``vocab_size`` ids (see the module docstring)."""
    vocab_size = int(vocab_size)
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] for a byte-level BPE "
                         f"(3 special tokens + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(builtin_corpus(), trainer=trainer)
    have = tok.get_vocab_size(with_added_tokens=True)
    if have < vocab_size:
        tok.add_special_tokens([AddedToken(f"<extra_{i}>", special=True, normalized=False)
                                for i in range(vocab_size - have)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_ID)],
    )
    got = tok.get_vocab_size(with_added_tokens=True)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != vocab_size or ids != [UNK_ID, BOS_ID, EOS_ID]:  # pragma: no cover - tokenizers invariant
        raise RuntimeError(f"tokenizer build went wrong: size {got} (wanted {vocab_size}), special ids {ids}")
    return tok


def save_tokenizer_files(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 4096) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "added_tokens_decoder": added,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
