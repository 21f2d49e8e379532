"""
The tokenizer: byte-level BPE from the `tokenizers` library, plus nanocrs' added tokens.

Added tokens are atomic (never split, never merged with text), and only ever come from code:
  - control tokens  <BOI> <EOI> <MODE=REC> <MODE=CHAT> <RESP> <EOT>
  - one token per (semantic-ID level, code): <a_0> ... <a_31>, <b_0> ..., the suffix level included.
They are appended after the BPE vocabulary, so a pretrained backbone's token ids stay where they
were and the new embedding rows sit at the end of the matrix.

    tok = Tokenizer.train(texts, vocab_size=2048, added=added_tokens(sids))
    tok.save("data/synthetic/tokenizer.json"); tok = Tokenizer.load("data/synthetic/tokenizer.json")
    ids = tok.encode("<MODE=REC><BOI>")       # nanocrs' own strings: added tokens are matched
    ids = tok.encode_text("I typed <BOI>")     # free text (users, datasets): "<BOI>" stays plain bytes
"""

import os
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer, AddedToken, decoders, models, pre_tokenizers, trainers

from nanocrs.common import atomic_path

BOI, EOI, MODE_REC, MODE_CHAT, RESP, EOT = "<BOI>", "<EOI>", "<MODE=REC>", "<MODE=CHAT>", "<RESP>", "<EOT>"
CONTROL_TOKENS = [BOI, EOI, MODE_REC, MODE_CHAT, RESP, EOT]
# Role prefixes are plain text, as in the paper ("Assistant:" then the structured target)
USER_PREFIX, ASSISTANT_PREFIX = "User:", "Assistant:"


@dataclass(frozen=True)
class Control:
    """The ids of the six control tokens in one tokenizer, looked up once (Control.of): what the
    renderer writes and parses (nanocrs/data.py) and what the decoder constrains (nanocrs/generate.py)."""
    boi: int
    eoi: int
    mode_rec: int
    mode_chat: int
    resp: int
    eot: int

    @classmethod
    def of(cls, tokenizer) -> "Control":
        return cls(*(tokenizer.id(t) for t in CONTROL_TOKENS))  # the fields are in CONTROL_TOKENS' order


def added_tokens(sids) -> list[str]:
    """The tokens nanocrs adds to a vocabulary, in the order their ids follow: the control tokens, then
    every semantic-ID token of the table `sids` (a quantizer.SemanticIDs)."""
    return CONTROL_TOKENS + sids.all_token_strings()


class Tokenizer:
    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        # the library pads/truncates if the file asks for it; we never want that here
        self.tk.no_padding()
        self.tk.no_truncation()

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size: int, added: list[str]) -> "Tokenizer":
        """Byte-level BPE on an iterable of strings, then the added tokens appended after it."""
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        tok = cls(tk)
        tok.add_tokens(added)
        return tok

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(path))
        except Exception as e:  # the library's message is long; keep the first line
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None

    def save(self, path: str):
        with atomic_path(path) as tmp:
            self.tk.save(tmp)

    def add_tokens(self, tokens: list[str]) -> int:
        """Append tokens (skipping ones already present); returns how many were new."""
        new = [t for t in tokens if self.tk.token_to_id(t) is None]
        self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        return len(new)

    # -- use ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text written by nanocrs itself: "<BOI>" in it is the control token."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Free text from a user or a dataset: added tokens in it are encoded as the plain bytes they
        are, so typing "<BOI>" or "<a_1><b_2>" can never produce a control or semantic-ID token.
        Text without them encodes exactly as encode() does."""
        self.tk.encode_special_tokens = True  # the library's switch: match no special token in the text
        try:
            return self.tk.encode(text, add_special_tokens=False).ids
        finally:
            self.tk.encode_special_tokens = False

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def token(self, i: int) -> str:
        return self.tk.id_to_token(i)

    def id(self, token: str) -> int:
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        return i
