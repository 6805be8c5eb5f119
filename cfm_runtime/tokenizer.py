"""Tokenizers and chat templates taken from the model file itself.

GGUF models with a byte-level BPE vocabulary and a pre-tokenizer in `BPE_PRE_TOKENIZERS` (the embedded
SmolLM2 among them) run on the `tokenizers` library, built from the file's own vocabulary and merges: the
same ids as llama.cpp (checked token for token), in a third of its memory, without loading llama.cpp.
Every other GGUF tokenizer is llama.cpp's own (llama-cpp-python with `vocab_only=True`), the reference
implementation of every GGUF tokenizer type and pre-tokenizer. Hugging Face folders use the `tokenizers`
library on their `tokenizer.json`. Chat templates are the model's Jinja template, rendered in a sandbox.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
import json
from datetime import datetime
from pathlib import Path

from .errors import CfmError, ModelFileError


@contextlib.contextmanager
def quiet_stderr():
    """Silence C-level writes to fd 2 (llama.cpp logs there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def render_chat_template(template: str | None, messages, bos: str, eos: str, add_generation_prompt: bool = True,
                         tools: list[dict] | None = None) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not template:
        raise CfmError("this model has no chat template; use a plain prompt instead of chat messages")
    check_messages(messages)

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        extra = {"tools": tools} if tools else {}
        return env.from_string(template).render(
            messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt, **extra
        )
    except TemplateError as e:
        raise CfmError(f"the model's chat template rejected the messages: {e}") from e


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise CfmError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise CfmError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")


class Tokenizer:
    """Common interface: encode, decode, streaming decode, chat template, end-of-generation ids."""

    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]
    chat_template: str | None
    bos_text: str
    eos_text: str
    vocab_size: int
    _lltokenizer = None  # llguidance's form of this vocabulary, built by grammar_tokenizer()

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI function tools, for a template that describes them itself (`template_takes_tools`)."""
        return render_chat_template(self.chat_template, messages, self.bos_text, self.eos_text, add_generation_prompt,
                                    tools)

    @property
    def template_takes_tools(self) -> bool:
        """The chat template reads a `tools` variable (it describes tools in its own words)."""
        return bool(self.chat_template) and "tools" in self.chat_template

    def streamer(self) -> "TextStreamer":
        return TextStreamer(self)

    def grammar_tokenizer(self):
        """This vocabulary for llguidance (`cfm_runtime.grammar`): built on first use (about a second), kept."""
        if self._lltokenizer is None:
            self._lltokenizer = self._make_lltokenizer()
        return self._lltokenizer

    def _make_lltokenizer(self):
        raise NotImplementedError


class TextStreamer:
    """Turns token ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.decoder.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


class _GGUFVocabulary(Tokenizer):
    """What both GGUF tokenizers take from the file's metadata, and the BOS rule of their `encode`."""

    add_bos: bool

    def _read_specials(self, metadata: dict) -> None:
        """BOS/EOS ids and texts, add_bos, the chat template (after vocab_size and token_bytes work)."""
        self.bos_id = self._special(metadata.get("tokenizer.ggml.bos_token_id"))
        self.eos_id = self._special(metadata.get("tokenizer.ggml.eos_token_id"))
        self.bos_text = self.token_bytes(self.bos_id, special=True).decode("utf-8", "replace") if self.bos_id is not None else ""
        self.eos_text = self.token_bytes(self.eos_id, special=True).decode("utf-8", "replace") if self.eos_id is not None else ""
        self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        self.chat_template = metadata.get("tokenizer.chat_template")

    def _special(self, value) -> int | None:
        return int(value) if value is not None and 0 <= int(value) < self.vocab_size else None

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise CfmError(f"text to encode must be a string, got {type(text).__name__}")
        add_bos = add_special and self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + self._ids(text)

    def _ids(self, text: str) -> list[int]:
        """The text's token ids, special tokens in it parsed, no BOS added."""
        raise NotImplementedError


class GGUFTokenizer(_GGUFVocabulary):
    def __init__(self, path: Path, metadata: dict):
        import llama_cpp

        try:
            with quiet_stderr():  # llama.cpp warns about a context size it never uses here
                self._llama = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except Exception as e:  # llama.cpp reports load failures as ValueError/RuntimeError
            raise ModelFileError(f"llama.cpp could not read the vocabulary of {path}: {e}") from e
        vocab = self._llama._model.vocab
        self._pieces: dict[tuple[int, bool], bytes] = {}
        self.vocab_size = self._llama.n_vocab()
        self.eog_ids = frozenset(i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i))
        self._read_specials(metadata)

    def _make_lltokenizer(self):
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():  # it reads token attributes through a name llama-cpp-python deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(self._llama._model.vocab, eos_token=sorted(self.eog_ids))

    def _ids(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        import ctypes

        import llama_cpp

        key = (int(token_id), special)
        piece = self._pieces.get(key)
        if piece is None:
            if not 0 <= key[0] < self.vocab_size:
                raise CfmError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._llama._model.vocab, key[0], buf, 64, 0, special)
            if n < 0:  # the piece is longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._llama._model.vocab, key[0], buf, -n, 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece


# llama.cpp's pre-tokenizers (tokenizer.ggml.pre) that the `tokenizers` library reproduces, as its
# pre-tokenizer: each is checked token for token against llama.cpp (tests/test_tokenizer.py). A GGUF file with
# another one is tokenized by llama.cpp itself.
BPE_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
}
# Which tokens llama.cpp ends a generation on besides the file's EOS/EOT/EOM ids: control tokens of these texts
# (end of turn or text; fill-in-the-middle padding, repository and file separators).
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>", "<|fim_sep|>", "<fim-sep>", "<fim_sep>"})
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def lean_bpe_supported(metadata: dict) -> bool:
    """Whether `GGUFBPETokenizer` tokenizes this GGUF file as llama.cpp does."""
    return metadata.get("tokenizer.ggml.model") == "gpt2" and metadata.get("tokenizer.ggml.pre") in BPE_PRE_TOKENIZERS


def gguf_tokenizer(path: Path, metadata: dict) -> Tokenizer:
    """The tokenizer of a GGUF file: `GGUFBPETokenizer` where it reproduces llama.cpp, else llama.cpp's own."""
    if lean_bpe_supported(metadata):
        return GGUFBPETokenizer(path, metadata)
    return GGUFTokenizer(path, metadata)


class GGUFBPETokenizer(_GGUFVocabulary):
    """A GGUF file's byte-level BPE vocabulary run by the `tokenizers` library: built from the file's tokens,
    types and merges (read one at a time) and its pre-tokenizer (`BPE_PRE_TOKENIZERS`). It gives llama.cpp's
    token ids, pieces and end-of-generation tokens, and keeps ~14 MB where llama.cpp's vocabulary and library take
    ~40 MB, which matters to a process under a memory cap."""

    def __init__(self, path: Path, metadata: dict):
        from tokenizers import Tokenizer as _Tok

        from .gguf_file import metadata_array

        types = list(metadata_array(path, "tokenizer.ggml.token_type"))
        quote = json.encoder.encode_basestring_ascii  # json.dumps of one string, without its overhead
        vocab, added, self._text = io.StringIO(), [], {}
        vocab.write("{")
        for i, token in enumerate(metadata_array(path, "tokenizer.ggml.tokens")):
            vocab.write(f"{',' if i else ''}{quote(token)}:{i}")
            if types[i] in (_CONTROL, _USER_DEFINED):
                self._text[i] = token
                added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": types[i] == _CONTROL})
        vocab.write("}")
        merges = "[" + ",".join(quote(m) for m in metadata_array(path, "tokenizer.ggml.merges")) + "]"
        spec = ('{"version": "1.0", "added_tokens": ' + json.dumps(added) + ', "normalizer": null, '
                '"pre_tokenizer": ' + json.dumps(BPE_PRE_TOKENIZERS[metadata["tokenizer.ggml.pre"]]) + ', '
                '"post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, '
                '"trim_offsets": true, "use_regex": true}, "model": {"type": "BPE", "dropout": null, '
                '"unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, '
                '"fuse_unk": false, "byte_fallback": false, "ignore_merges": false, '
                '"vocab": ' + vocab.getvalue() + ', "merges": ' + merges + '}}')
        del vocab, merges
        try:
            self._tok = _Tok.from_str(spec)
        except Exception as e:  # the tokenizers library reports a bad vocabulary as a plain Exception
            raise ModelFileError(f"{path}: its vocabulary could not be read as byte-level BPE: {e}") from e
        del spec
        self.vocab_size = len(types)
        self._control = frozenset(i for i, t in enumerate(types) if t == _CONTROL)
        self._pieces: dict[int, bytes] = {}
        self._read_specials(metadata)
        ends = {self._special(metadata.get(k)) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                         "tokenizer.ggml.eom_token_id")}
        self.eog_ids = frozenset({i for i in ends if i is not None} |
                                 {i for i, text in self._text.items() if text in _EOG_TEXTS})

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """A token's bytes as llama.cpp's token_to_piece gives them: control tokens only with `special`."""
        token_id = int(token_id)
        if token_id in self._text:
            return self._text[token_id].encode() if special or token_id not in self._control else b""
        piece = self._pieces.get(token_id)
        if piece is None:
            if not 0 <= token_id < self.vocab_size:
                raise CfmError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
            piece = self._pieces[token_id] = _hf_token_bytes(self._tok, token_id)
        return piece

    def _make_lltokenizer(self):
        return _lltokenizer(self._tok, self.vocab_size, self.eog_ids)


class HFTokenizer(Tokenizer):
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as _Tok

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFileError(f"{folder} has no tokenizer.json; the tokenizer must be saved with the model")
        self._tok = _Tok.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        gen_path = folder / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

        def tok_text(v):
            return v.get("content", "") if isinstance(v, dict) else (v or "")

        self.bos_text, self.eos_text = tok_text(cfg.get("bos_token")), tok_text(cfg.get("eos_token"))
        self.bos_id = self._tok.token_to_id(self.bos_text) if self.bos_text else None
        self.eos_id = self._tok.token_to_id(self.eos_text) if self.eos_text else None
        eos_ids = gen.get("eos_token_id", [])
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        self.eog_ids = frozenset(i for i in [self.eos_id, *eos_ids] if i is not None)
        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        self.chat_template = template
        # byte-level BPE decodes token by token through the decoder; cache the byte pieces
        self._bytes_cache: dict[int, bytes] = {}

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise CfmError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=add_special).ids
        if len(ids) > 1 and self.bos_id is not None and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]  # the template already wrote the BOS token
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _make_lltokenizer(self):
        return _lltokenizer(self._tok, self.vocab_size, self.eog_ids)

    def token_bytes(self, token_id: int) -> bytes:
        b = self._bytes_cache.get(token_id)
        if b is None:
            b = _hf_token_bytes(self._tok, token_id)
            self._bytes_cache[token_id] = b
        return b


def _lltokenizer(tok, vocab_size: int, eog_ids):
    """llguidance's form of a `tokenizers` vocabulary (from its JSON)."""
    import llguidance

    return llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab_size, eos_token=sorted(eog_ids))


def _hf_token_bytes(tok, token_id: int) -> bytes:
    """Bytes of one token for byte-level BPE (GPT-2 byte alphabet) or SentencePiece-style vocabularies."""
    piece = tok.id_to_token(token_id)
    if piece is None:
        return b""
    if tok.get_added_tokens_decoder().get(token_id) is not None:
        added = tok.get_added_tokens_decoder()[token_id]
        return b"" if added.special else added.content.encode()
    table = _byte_decoder()
    if all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


_BYTE_DECODER: dict[str, int] | None = None


def _byte_decoder() -> dict[str, int]:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER = {chr(c): b for b, c in zip(bs, cs)}
    return _BYTE_DECODER
