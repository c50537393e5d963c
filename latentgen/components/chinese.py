"""Chinese prompts: a character-level tokenizer and the student text encoder that reads them.

The default model's text encoder, all-MiniLM-L6-v2, reads English only (its WordPiece table maps 红, 蓝 and 圆 to
[UNK]), and no multilingual encoder's weights can be had offline. So a small student encoder is trained to give,
for a Chinese caption, the per-token states MiniLM gives for the same caption in English (multilingual knowledge
distillation: Reimers & Gurevych 2020; AltCLIP, Chen et al. 2022; `latentgen.training.text_student`). The
U-Net then reads Chinese without being trained on it.

Tokens are characters, as BERT-Chinese reads them (`BertTokenizerFast` puts every CJK character in a token of its
own): the vocabulary is the characters of pypinyin's phrase dictionary (5,195 common ones, from a package, not a
hub) and the dataset's captions. Traditional characters are read as their simplified forms (OpenCC's tables, from
`opencc-python-reimplemented`); a character outside the vocabulary is [UNK], with a warning.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

from latentgen.components.text_encoders import TransformersTextEncoder
from latentgen.errors import UserError

log = logging.getLogger("latentgen")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = list("，。、；：！？,.;:!?（）()“”\"' 0123456789")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]{2,}")  # a Latin word (one letter alone may be a variable, a unit, ...)


def is_chinese(text: str) -> bool:
    """Whether a prompt is written in Chinese (it holds a CJK character)."""
    return _CJK.search(text) is not None


def check_one_language(text: str) -> None:
    """Chinese and English words in one prompt are refused: each encoder reads only its own language."""
    if is_chinese(text):
        words = _LATIN.findall(re.sub(r"<[^>]*>", "", text))  # LoRA tags aside
        if words:
            raise UserError(f"the prompt {text!r} mixes Chinese with English words ({', '.join(words[:3])}); write "
                            "it in one language")


def common_characters() -> list[str]:
    """The characters of pypinyin's phrase dictionary (common Chinese words), in code-point order."""
    try:
        from pypinyin.phrases_dict import phrases_dict
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("building a Chinese vocabulary needs pypinyin (pip install pypinyin)") from None
    return sorted({c for phrase in phrases_dict for c in phrase if _CJK.match(c)})


def vocabulary(texts: Iterable[str]) -> list[str]:
    """The student's tokens: BERT's special tokens, punctuation and digits, the common characters, and every
    character of `texts` (the training captions) not among them."""
    chars = common_characters()
    known = set(chars)
    extra = sorted({c for t in texts for c in simplified(t) if _CJK.match(c) and c not in known})
    return SPECIAL + PUNCTUATION + chars + extra


def make_tokenizer(vocab: Sequence[str], max_length: int = 32):
    """A BERT tokenizer over a character vocabulary (each CJK character one token, as BERT-Chinese)."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=False,
                                  tokenize_chinese_chars=True, strip_accents=False)
    tokenizer.model_max_length = max_length
    return tokenizer


def student_config(vocab_size: int, hidden_size: int = 384, layers: int = 4, heads: int = 6,
                   intermediate: int = 1024, max_length: int = 32):
    """The student's architecture: a BERT encoder whose width is the teacher's, so its states go to the U-Net as
    they are."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate,
                        max_position_embeddings=2 * max_length, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    config.use_attention_mask = True  # padding is masked in the encoder, as for MiniLM (`load_transformers_encoder`)
    return config


_converter = None


def simplified(text: str) -> str:
    """Traditional characters as simplified ones (紅色的圓形 -> 红色的圆形), by OpenCC's character tables."""
    global _converter
    if _converter is None:
        from opencc import OpenCC

        _converter = OpenCC("t2s")
    return _converter.convert(text)


class ChineseTextEncoder(TransformersTextEncoder):
    """The student behind the text-encoder interface: prompts simplified first, unknown characters warned of."""

    def token_ids(self, text: str) -> list[int]:
        text = simplified(text)
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        unknown = self.tokenizer.unk_token_id
        if unknown in ids:
            missing = sorted({c for c in text if c.strip() and self.tokenizer.convert_tokens_to_ids(c) == unknown})
            log.warning(f"the Chinese text encoder has not learned {''.join(missing)}: read as unknown")
        return ids

    def tokenize(self, prompts: Sequence[str], max_length: int | None = None):
        return super().tokenize([simplified(p) for p in prompts], max_length)
