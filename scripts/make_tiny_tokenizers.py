"""Train the two small BPE tokenizers shipped for tests (run once; the outputs are committed).

``bytelevel``: GPT-2/Qwen-style byte-level BPE. ``metaspace``: Llama/SentencePiece-style BPE with
``▁`` word markers and byte fallback. Both are trained on the project's own text (templates, pools,
names) so fictional subjects and real objects tokenize into a few pieces each.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "rotelab" / "resources"
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = 2048


def corpus() -> list[str]:
    lines = []
    for p in sorted(RES.rglob("*.yaml")) + sorted((RES / "pools").glob("*.txt")):
        lines += [line.strip(" -'\"") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines += ["The capital of France is Paris.", "The quick brown fox jumps over the lazy dog."]
    return lines


def bytelevel() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL + bytes_, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


if __name__ == "__main__":
    for name, build in (("bytelevel", bytelevel), ("metaspace", metaspace)):
        out = RES / "tokenizers" / name
        out.mkdir(parents=True, exist_ok=True)
        build().save(str(out / "tokenizer.json"))
        print("wrote", out / "tokenizer.json")
