"""CLIP byte-level BPE tokenizer built on the HuggingFace ``tokenizers`` library.

The pipeline reproduces ``transformers.CLIPTokenizer`` (the ``tokenizers``-backed one) exactly:
NFC normalisation, every whitespace run replaced by one space, lowercasing, the CLIP split regex,
GPT-2 byte-to-unicode alphabet, and BPE with the ``</w>`` end-of-word suffix. ``<|startoftext|>``
and ``<|endoftext|>`` are special tokens (matched in raw text before normalisation, as there), and
so is the pad token: with SD2's pad ``"!"`` every ``!`` in a prompt is id 0, as in transformers.

Vocabulary sources: a diffusers ``tokenizer/`` folder (``from_folder``: ``tokenizer.json`` or the older
``vocab.json`` + ``merges.txt``), the open-clip merges file shipped in ``runtime/data`` (``bundled``),
or our own one-file JSON form (``to_json`` / ``from_json``) that an artifact can store.

This module must not import sdexport, transformers or diffusers.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_MAX_LENGTH",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "ClipTokenizer",
    "TokenizerFileError",
    "bundled_vocab_and_merges",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MAX_LENGTH = 77
# Pad token by model family: SD1's CLIP pads with the end token, SD2's OpenCLIP with "!" (id 0).
PAD_TOKEN = {"sd1": EOS_TOKEN, "sd2": "!"}

# Same split as transformers' CLIPTokenizer (and OpenAI CLIP's ``self.pat``).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

_JSON_FORMAT = "sdexport.clip_tokenizer"
_JSON_VERSION = 1

# open-clip / OpenAI CLIP: 49152 - 256 - 2 merges are used from the merges file.
_BUNDLED_MERGES = 49152 - 256 - 2
_BUNDLED_FILE = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerFileError(ValueError):
    """A tokenizer file (or serialised tokenizer) is corrupt or inconsistent."""


@functools.cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """GPT-2/CLIP byte -> printable unicode alphabet, in CLIP's vocabulary order (256 chars)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


@functools.cache
def bundled_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The 49408-token CLIP vocabulary and its merges, built from the bundled open-clip file.

    Built the way open_clip / OpenAI CLIP do: the 256 byte characters, the same with ``</w>``,
    one token per merge (in merge order), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    raw = resources.files("runtime").joinpath("data", _BUNDLED_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : _BUNDLED_MERGES + 1]:
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"bundled {_BUNDLED_FILE}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _BUNDLED_MERGES:
        raise TokenizerFileError(f"bundled {_BUNDLED_FILE}: only {len(merges)} merges")
    alphabet = _bytes_to_unicode()
    tokens = list(alphabet) + [c + END_OF_WORD for c in alphabet]
    tokens += [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerFileError(f"bundled {_BUNDLED_FILE}: duplicate tokens")
    return vocab, tuple(merges)


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str) -> Tokenizer:
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
            unk_token=unk,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    return tok


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file missing: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {e}") from e


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(f"corrupt tokenizer file {path}: invalid JSON ({e})") from e


def _read_merges(path: Path) -> list[tuple[str, str]]:
    text = _read_text(path)
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerFileError(f"corrupt tokenizer file {path}: line {lineno} is not a merge: {line!r}")
        merges.append((parts[0], parts[1]))
    if not merges:
        raise TokenizerFileError(f"corrupt tokenizer file {path}: no merges")
    return merges


def _checked_vocab(raw: Any, path: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in raw.items()
    ):
        raise TokenizerFileError(f"corrupt tokenizer file {path}: expected an object of token -> int")
    return dict(raw)


def _merge_pair(m: Any) -> tuple[str, str] | None:
    """A tokenizer.json merge: "a b" (tokenizers < 0.20) or ["a", "b"]."""
    parts = m.split(" ") if isinstance(m, str) else m
    if isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) for p in parts):
        return parts[0], parts[1]
    return None


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """model.vocab and model.merges of the ``tokenizers`` library's own file (a BPE model)."""
    doc = _read_json(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerFileError(f"corrupt tokenizer file {path}: expected a BPE model")
    vocab = _checked_vocab(model.get("vocab"), path)
    raw = model.get("merges")
    merges = [_merge_pair(m) for m in raw] if isinstance(raw, list) else [None]
    if not merges or None in merges:
        raise TokenizerFileError(f"corrupt tokenizer file {path}: model.merges must be a list of pairs")
    return vocab, [m for m in merges if m is not None]


def _read_vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], Path, Path]:
    """-> (vocab, merges, vocab file, merges file): tokenizer.json if present, else vocab.json + merges.txt."""
    unified = folder / "tokenizer.json"
    if unified.is_file():
        vocab, merges = _read_tokenizer_json(unified)
        return vocab, merges, unified, unified
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab = _checked_vocab(_read_json(vocab_path), vocab_path)
    return vocab, _read_merges(merges_path), vocab_path, merges_path


def _configured_pad(folder: Path, config: dict[str, Any]) -> str:
    """The pad token of tokenizer_config.json, else of special_tokens_map.json, else the end token."""
    special: dict[str, Any] = {}
    special_path = folder / "special_tokens_map.json"
    if special_path.is_file():
        loaded = _read_json(special_path)
        if isinstance(loaded, dict):
            special = loaded
    return _token_content(config.get("pad_token")) or _token_content(special.get("pad_token")) or EOS_TOKEN


def _sane_max_length(value: Any) -> int:
    # Some configs carry huge sentinels (1e30); CLIP text encoders are 77 positions.
    if isinstance(value, int) and not isinstance(value, bool) and 3 <= value <= 4096:
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and 3 <= value <= 4096:
        return int(value)
    return DEFAULT_MAX_LENGTH


class ClipTokenizer:
    """CLIP tokenizer: text -> BPE ids (no BOS/EOS), plus the special ids and sequence length."""

    bos_id: int
    eos_id: int
    pad_id: int
    max_length: int

    def __init__(self, backend: Tokenizer, pad_token: str = EOS_TOKEN, max_length: int = DEFAULT_MAX_LENGTH):
        self._tok = backend
        self.pad_token = pad_token
        if pad_token not in (BOS_TOKEN, EOS_TOKEN) and backend.token_to_id(pad_token) is not None:
            # transformers makes the pad token special too, so SD2's "!" in a prompt becomes id 0
            # (not "!</w>" = 256) and splits the text around it. Reproduce that for parity.
            backend.add_special_tokens([pad_token])
        ids = {}
        for name, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", pad_token)):
            tid = backend.token_to_id(token)
            if tid is None:
                raise TokenizerFileError(f"{name} token {token!r} is not in the vocabulary")
            ids[name] = int(tid)
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.pad_id = ids["pad"]
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        self.max_length = max_length
        self.added: dict[str, list[int]] = {}  # textual inversion: name -> its ids (several for multi-vector)

    def add_tokens(self, name: str, count: int = 1) -> list[int]:
        """Add `name` (and `name_1` .. `name_{count-1}`, as diffusers names multi-vector embeddings) as
        tokens with new ids after the vocabulary; `name` in a text then stands for all `count` ids."""
        names = [name] + [f"{name}_{i}" for i in range(1, count)]
        taken = self.taken(name, count)
        if taken:
            raise ValueError(f"token {taken[0]!r} is already in the tokenizer")
        self._tok.add_tokens([AddedToken(n, single_word=False, lstrip=False, rstrip=False, normalized=True)
                              for n in names])
        ids = [int(self._tok.token_to_id(n) or 0) for n in names]
        self.added[name] = ids
        return ids

    def taken(self, name: str, count: int = 1) -> list[str]:
        """The names `add_tokens(name, count)` would add that are tokens already."""
        names = [name] + [f"{name}_{i}" for i in range(1, count)]
        return [n for n in names if self._tok.token_to_id(n) is not None]

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_vocab(
        cls,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad: str = EOS_TOKEN,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> ClipTokenizer:
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise TokenizerFileError(f"vocabulary lacks the special token {token!r}")
        try:
            backend = _build_backend(vocab, merges, EOS_TOKEN)
        except Exception as e:  # tokenizers raises plain Exception for inconsistent merges
            raise TokenizerFileError(f"vocabulary and merges are inconsistent: {e}") from e
        return cls(backend, pad_token=pad, max_length=max_length)

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """Load a diffusers ``tokenizer/`` folder: ``tokenizer.json`` (what transformers >= 5 writes) or
        ``vocab.json`` + ``merges.txt``; pad token and length from tokenizer_config.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder missing: {folder}")
        vocab, merges, vocab_path, merges_path = _read_vocab_and_merges(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise TokenizerFileError(f"corrupt tokenizer file {config_path}: expected a JSON object")
        pad = _configured_pad(folder, config)
        if pad not in vocab:
            raise TokenizerFileError(f"{config_path}: pad token {pad!r} is not in {vocab_path.name}")
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise TokenizerFileError(
                    f"corrupt tokenizer file {vocab_path}: lacks the special token {token!r}"
                )
        try:
            backend = _build_backend(vocab, merges, EOS_TOKEN)
        except Exception as e:
            raise TokenizerFileError(f"{merges_path} does not fit {vocab_path}: {e}") from e
        return cls(backend, pad_token=pad, max_length=_sane_max_length(config.get("model_max_length")))

    @classmethod
    def bundled(cls, pad: str = EOS_TOKEN) -> ClipTokenizer:
        """The standard CLIP vocabulary (SD1/SD2 text encoders) from the bundled open-clip merges.

        ``pad`` is the family's :data:`PAD_TOKEN` (``"<|endoftext|>"`` for SD1, ``"!"`` for SD2).
        """
        vocab, merges = bundled_vocab_and_merges()
        return cls.from_vocab(dict(vocab), list(merges), pad=pad)

    # ----------------------------------------------------------------------------- serialisation
    def to_json(self) -> str:
        """One JSON document: tokenizers' own ``tokenizer.json`` plus our pad/bos/eos/length info."""
        doc = {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": self.pad_token,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "max_length": self.max_length,
            "tokenizer": self._tok.to_str(),  # tokenizers' tokenizer.json, as a string
            "added": self.added,  # textual-inversion names -> ids (optional; absent before LoRA/TI support)
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ClipTokenizer:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise TokenizerFileError(f"serialised tokenizer is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != _JSON_FORMAT:
            raise TokenizerFileError(f"not a serialised ClipTokenizer (format != {_JSON_FORMAT!r})")
        if doc.get("version") != _JSON_VERSION:
            raise TokenizerFileError(f"unsupported serialised ClipTokenizer version {doc.get('version')!r}")
        try:
            inner = doc["tokenizer"]
            backend = Tokenizer.from_str(inner if isinstance(inner, str) else json.dumps(inner))
            pad = str(doc["pad_token"])
            max_length = int(doc["max_length"])
        except Exception as e:
            raise TokenizerFileError(f"corrupt serialised ClipTokenizer: {e}") from e
        tok = cls(backend, pad_token=pad, max_length=max_length)
        tok.added = {str(k): [int(i) for i in v] for k, v in dict(doc.get("added") or {}).items()}
        expected = (doc.get("bos_id"), doc.get("eos_id"), doc.get("pad_id"))
        if expected != (tok.bos_id, tok.eos_id, tok.pad_id):
            raise TokenizerFileError(
                f"serialised ClipTokenizer ids {expected} do not match its vocabulary "
                f"{(tok.bos_id, tok.eos_id, tok.pad_id)}"
            )
        return tok

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        model = json.loads(self._tok.to_str())["model"]
        vocab = {str(k): int(v) for k, v in model["vocab"].items()}
        merges = [
            (m.split(" ")[0], m.split(" ")[1]) if isinstance(m, str) else (str(m[0]), str(m[1]))
            for m in model["merges"]
        ]
        return vocab, merges

    def save_folder(self, folder: Path) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (diffusers layout)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab, merges = self.vocab_and_merges()
        ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
        (folder / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False), encoding="utf-8")
        merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
        special = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": self.pad_token,
            "unk_token": EOS_TOKEN,
        }
        config = {
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": self.max_length,
            "tokenizer_class": "CLIPTokenizer",
            **special,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(
            json.dumps(special, indent=2) + "\n", encoding="utf-8"
        )

    # ----------------------------------------------------------------------------- use
    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of ``text``, without BOS/EOS, padding or truncation."""
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if not self.added:
            return ids
        expand = {v[0]: v for v in self.added.values()}
        return [j for i in ids for j in expand.get(i, [i])]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens dropped), word ends turned into spaces as CLIP does."""
        text = str(self._tok.decode(ids, skip_special_tokens=True))
        return text.replace(END_OF_WORD, " ").strip()

    def __repr__(self) -> str:
        return (
            f"ClipTokenizer(vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id} {self.pad_token!r}, max_length={self.max_length})"
        )
