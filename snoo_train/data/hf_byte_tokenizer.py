"""The byte tokenizer (snoo_train/data/tokenizer.py, ByteTokenizer) behind the `transformers`
tokenizer interface, for tools that only speak that interface (lm-evaluation-harness's HFLM).

Token i < 256 is byte i of the UTF-8 text; 256 is the end-of-document token (eos, and the
prefix lm-eval puts before an empty context). No special token is ever added to encoded text,
as in training. Each byte is spelled as one character (chr(byte)) inside the tokenizer only.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizer

from snoo_train.data.tokenizer import ByteTokenizer

EOS = "<|endofdoc|>"


class HFByteTokenizer(PreTrainedTokenizer):
    """Encodes exactly as ByteTokenizer.encode; decodes invalid UTF-8 with replacement."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        kwargs.setdefault("eos_token", EOS)
        kwargs.setdefault("pad_token", EOS)
        kwargs.setdefault("name_or_path", ByteTokenizer.name)
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return ByteTokenizer.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {**{chr(b): b for b in range(256)}, EOS: ByteTokenizer.eos_id}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        return ByteTokenizer.eos_id if token == EOS else ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return EOS if index == ByteTokenizer.eos_id else chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytes(ord(t) for t in tokens if t != EOS and ord(t) < 256)
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, ids, pair=None):
        return list(ids) + (list(pair) if pair else [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()  # nothing to save: the vocabulary is the 256 byte values and eos
