"""A thin tokenizer over the `tokenizers` library, with BOS under our control.

The underlying `tokenizers.Tokenizer` does the BPE work. What this class adds
is explicit special-token policy: the post-processor never adds tokens on its
own (every call encodes with `add_special_tokens=False`), and a BOS is
prepended only when asked, at most once. Checkpoints disagree about where the
"add a BOS" fact lives (the `add_bos_token` flag in `tokenizer_config.json`,
or a `TemplateProcessing` post-processor in `tokenizer.json`, or both);
`Tokenizer.from_file` reads both so the answer is one flag, `add_bos`.

The constructor is a contract shared with the GGUF loader, which builds a
`tokenizers.Tokenizer` from a GGUF vocabulary and passes the ids it read from
the GGUF metadata.

Special-token strings typed by users are text, not control tokens. The
`tokenizers` library turns every occurrence of a special token's string
(`<|im_end|>`, `<|im_start|>`, ...) into its id, wherever it comes from, so a
user message containing "<|im_end|>" would end the turn early. Here:

- `apply_chat_template` marks such strings inside message contents with
  `SPECIAL_ESCAPE` (U+FDD0, a Unicode noncharacter reserved for internal
  use) before rendering, so the text it returns tells the template's own
  special tokens (control tokens) from the ones users typed (plain text);
- `encode` drops the marks and encodes marked strings as plain text (text
  without marks encodes exactly as the `tokenizers` library does);
- `encode(text, plain=True)` encodes all of `text` literally as plain text
  (used for responses, which are never template output).
"""
import json
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from jaxreward.data import chat_template as chat_template_lib
from jaxreward.errors import UserError

# Marks a special-token string inside user text: U+FDD0 is a Unicode
# noncharacter, "permanently reserved for internal use", so it never appears
# in real text. `Tokenizer.escape` puts one after the first character of each
# special-token string it finds (so no added token matches it any more) and
# doubles a U+FDD0 already there; `Tokenizer.unescape` undoes both.
SPECIAL_ESCAPE = "\ufdd0"
_UNESCAPE = re.compile(SPECIAL_ESCAPE + "(" + SPECIAL_ESCAPE + "?)")


class TokenizeError(UserError):
    """Text the tokenizer cannot encode (e.g. a lone surrogate, which is not
    valid Unicode). `reason` is a short label to count by; the message adds
    the detail."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(reason + (f" ({detail})" if detail else ""))

# Special tokens that end a turn or a document in common chat checkpoints.
# When one of these is a special token of the vocabulary and the chat template
# writes it, generation stops on it (see `chat_stop_ids`).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
)


def chat_stop_ids(
    eos_id: int | None,
    chat_template: str | None,
    special_tokens: Mapping[str, int],
    declared_ids: Iterable[int] = (),
) -> tuple[int, ...]:
    """The ids that end generation; one rule for every loader (HF directory, GGUF).

    In order, de-duplicated:

    1. EOS;
    2. `declared_ids`: the checkpoint's own list of end ids
       (`generation_config.json`'s `eos_token_id`; a GGUF's
       `tokenizer.ggml.eot_token_id` / `eom_token_id`);
    3. every `END_OF_TURN_TOKENS` token that is a special (control) token of
       the vocabulary *and* appears in the chat template, i.e. the token the
       template closes a turn with (`<|im_end|>`, `<|eot_id|>`, ...).

    A special token the template never writes (e.g. SmolLM2's
    `<|endoftext|>`, a pretraining document separator) is not a stop id: a
    chat model ends its turn with the template's token.

    Args:
      eos_id: the EOS id, or None.
      chat_template: the jinja2 chat template, or None.
      special_tokens: content -> id of the special/control tokens.
      declared_ids: end ids the checkpoint lists itself.
    """
    ids = [] if eos_id is None else [int(eos_id)]
    ids += [int(i) for i in declared_ids]
    if chat_template:
        ids += [int(special_tokens[t]) for t in END_OF_TURN_TOKENS if t in special_tokens and t in chat_template]
    return tuple(dict.fromkeys(ids))


class Tokenizer:
    """Encodes/decodes text and renders chat templates; BOS is never implicit.

    Attributes:
      hf_tokenizer: the wrapped `tokenizers.Tokenizer`.
      add_bos: whether this checkpoint's sequences start with one BOS. Callers
        pass `encode(text, add_bos=tokenizer.add_bos)` for the first piece of
        a sequence and `add_bos=False` for continuations.
      chat_template: the jinja2 chat template string, or None.
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        add_bos: bool,
        chat_template: str | None,
        stop_ids: tuple[int, ...] = (),
    ):
        """Wraps `hf_tokenizer` with explicit special-token ids.

        Args:
          hf_tokenizer: a `tokenizers.Tokenizer`; its post-processor is ignored.
          bos_id: id of the beginning-of-sequence token, or None.
          eos_id: id of the end-of-sequence token, or None.
          pad_id: id used for padding, or None (then `pad_id` falls back to EOS).
          add_bos: whether sequences start with BOS (requires `bos_id`).
          chat_template: jinja2 chat template, or None.
          stop_ids: extra ids that end generation besides EOS (e.g. `<|im_end|>`).

        Raises:
          ValueError: `add_bos` without a `bos_id`, or an id outside the vocabulary.
        """
        self.hf_tokenizer = hf_tokenizer
        vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= int(value) < vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {vocab_size})")
        for value in stop_ids:
            if not 0 <= int(value) < vocab_size:
                raise ValueError(f"stop id {value} is outside the vocabulary (size {vocab_size})")
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True needs a bos_id")
        self._bos_id = None if bos_id is None else int(bos_id)
        self._eos_id = None if eos_id is None else int(eos_id)
        self._pad_id = None if pad_id is None else int(pad_id)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template or None
        extra = [] if self._eos_id is None else [self._eos_id]
        extra += [int(i) for i in stop_ids]
        self._stop_ids = tuple(dict.fromkeys(extra))  # de-duplicated, EOS first
        added = hf_tokenizer.get_added_tokens_decoder()
        self._special = {t.content: (i, t) for i, t in added.items() if t.special and t.content}
        # Leftmost-longest, as the tokenizers library matches added tokens.
        longest_first = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None
        self._plain_hf = None  # a copy with `encode_special_tokens=True`, made on first use

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | pathlib.Path,
        tokenizer_config_json_path: str | pathlib.Path | None = None,
    ) -> "Tokenizer":
        """Loads an HF tokenizer from `tokenizer.json` (+ `tokenizer_config.json`).

        `tokenizer_json_path` may also be the checkpoint directory. When
        `tokenizer_config_json_path` is None, a `tokenizer_config.json` next to
        `tokenizer.json` is used if present. Also read when present next to it:
        `chat_template.jinja` (newer checkpoints keep the template there; it
        wins over the config's, as in transformers), `chat_template.json`, and
        `generation_config.json` (its `eos_token_id` list adds stop ids). Stop
        ids follow `chat_stop_ids`, the rule the GGUF loader uses too.

        BOS policy: an explicit `add_bos_token` in the config decides;
        otherwise a `tokenizer.json` post-processor that prepends a special
        token means add_bos=True with that token as BOS. This is the rule of
        llama.cpp's converter (gguf `SpecialVocab`), so HF and GGUF loads of a
        checkpoint agree; transformers v4's Llama tokenizers also honour the
        flag, while transformers v5 ignores it when tokenizer.json exists.
        Either way `encode(text, add_bos=tok.add_bos)` gives one BOS, never two.

        Raises:
          FileNotFoundError: no tokenizer.json.
          ValueError: the config names a special token that is not in the vocabulary.
        """
        path = pathlib.Path(tokenizer_json_path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        hf = tokenizers.Tokenizer.from_file(str(path))
        directory = path.parent
        if tokenizer_config_json_path is None:
            candidate = directory / "tokenizer_config.json"
            tokenizer_config_json_path = candidate if candidate.is_file() else None
        config = {}
        if tokenizer_config_json_path is not None:
            config = json.loads(pathlib.Path(tokenizer_config_json_path).read_text())
        generation_config = {}
        if (directory / "generation_config.json").is_file():
            generation_config = json.loads((directory / "generation_config.json").read_text())

        def token_id(key):
            content = _token_content(config.get(key))
            if content is None:
                return None
            token = hf.token_to_id(content)
            if token is None:
                raise ValueError(f"{key} {content!r} from the tokenizer config is not in the vocabulary")
            return token

        bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        processor_bos = _post_processor_bos(json.loads(hf.to_str()).get("post_processor"))
        if isinstance(config.get("add_bos_token"), bool):
            add_bos = config["add_bos_token"]
            if bos_id is None:
                bos_id = processor_bos
        elif processor_bos is not None:
            add_bos, bos_id = True, processor_bos
        else:
            add_bos = False
        if add_bos and bos_id is None:
            raise ValueError(f"{tokenizer_config_json_path}: add_bos_token is true but no bos_token is set")

        template = _pick_template(config.get("chat_template"))
        if (directory / "chat_template.jinja").is_file():  # takes priority, as in transformers
            template = (directory / "chat_template.jinja").read_text()
        elif template is None and (directory / "chat_template.json").is_file():
            template = _pick_template(json.loads((directory / "chat_template.json").read_text()).get("chat_template"))

        stop = generation_config.get("eos_token_id")
        declared = [stop] if isinstance(stop, int) else list(stop or [])
        if eos_id is None and declared:
            eos_id = declared[0]
        special = {added.content: index for index, added in hf.get_added_tokens_decoder().items() if added.special}
        stop_ids = chat_stop_ids(eos_id, template, special, declared)
        return cls(
            hf,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            add_bos=add_bos,
            chat_template=template,
            stop_ids=tuple(stop_ids),
        )

    # --------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Padding id: the declared pad token, else EOS, else 0 (padding is always masked)."""
        if self._pad_id is not None:
            return self._pad_id
        return self._eos_id if self._eos_id is not None else 0

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS first, then the declared end-of-turn ids."""
        return self._stop_ids

    @property
    def bos_token(self) -> str | None:
        return None if self._bos_id is None else self.hf_tokenizer.id_to_token(self._bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self._eos_id is None else self.hf_tokenizer.id_to_token(self._eos_id)

    # ------------------------------------------------------------ encode/decode

    def encode(self, text: str, *, add_bos: bool = False, plain: bool = False) -> list[int]:
        """Token ids of `text`; the post-processor adds nothing.

        Special-token strings in `text` become their control ids (as in the
        `tokenizers` library), except the ones marked by `escape` (as
        `apply_chat_template` marks those inside message contents), which
        are encoded as plain text (U+FDD0, the mark, is reserved: in this
        mode it never reaches the tokenizer). With `plain=True` all of
        `text` is plain text, taken literally: no control token at all.

        With `add_bos=True` exactly one BOS is prepended, unless the text
        already encodes to a leading BOS (e.g. a chat template that writes
        `{{ bos_token }}`), so a sequence never starts with zero or two BOS.

        Raises:
          TokenizeError (a ValueError): text the tokenizer cannot encode
            (not valid Unicode, e.g. a lone surrogate).
          ValueError: `add_bos=True` but the tokenizer has no BOS.
        """
        return self._with_bos(self._ids(text, plain), add_bos)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                     plain: bool = False) -> list[list[int]]:
        """`encode` over many texts (parallel inside `tokenizers`).

        Raises:
          TokenizeError: naming the index of the first text that cannot be encoded.
        """
        texts = list(texts)
        if plain:
            hf, inputs = self._plain(), texts
        else:
            hf, inputs = self.hf_tokenizer, [t for t in texts if not _has_mark(t)]
        try:
            encodings = iter(hf.encode_batch(inputs, add_special_tokens=False))
        except BaseException as e:
            if not _tokenizer_error(e):
                raise
            for i, text in enumerate(texts):  # find the text that fails, and say why
                try:
                    self._ids(text, plain)
                except TokenizeError as bad:
                    detail = f"text {i}" + (f": {bad.detail}" if bad.detail else "")
                    raise TokenizeError(bad.reason, detail) from bad
            raise
        out = []
        for text in texts:
            ids = self._ids(text, plain) if not plain and _has_mark(text) else next(encodings).ids
            out.append(self._with_bos(ids, add_bos))
        return out

    def escape(self, text: str) -> str:
        """`text` with every special-token string marked as plain text (see
        `SPECIAL_ESCAPE`); `encode` gives its plain-text ids and `unescape`
        gives `text` back."""
        text = text.replace(SPECIAL_ESCAPE, SPECIAL_ESCAPE * 2)
        return self._mark(text) if self._special_re is not None else text

    def _mark(self, text: str) -> str:
        """A mark after the first character of each special-token string (and
        inside any special-token string the rest of it still holds)."""
        return self._special_re.sub(
            lambda m: m.group(0)[0] + SPECIAL_ESCAPE + self._mark(m.group(0)[1:]), text)

    @staticmethod
    def unescape(text: str) -> str:
        """`text` without `escape`'s marks (what `decode(encode(text))` reads)."""
        return _UNESCAPE.sub(lambda m: m.group(1), text) if SPECIAL_ESCAPE in text else text

    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that matches no special token (thread-safe:
        the flag is never toggled on the shared one)."""
        if self._plain_hf is None:
            plain = tokenizers.Tokenizer.from_str(self.hf_tokenizer.to_str())
            plain.encode_special_tokens = True
            self._plain_hf = plain
        return self._plain_hf

    def _ids(self, text: str, plain: bool) -> list[int]:
        try:
            if plain:
                return self._plain().encode(text, add_special_tokens=False).ids
            if not _has_mark(text):
                return self.hf_tokenizer.encode(text, add_special_tokens=False).ids
            return self._ids_marked(text)
        except BaseException as e:
            if not _tokenizer_error(e):
                raise
            _check_text(text)
            raise TokenizeError("tokenizer error", f"{type(e).__name__}: {e}") from e

    def _ids_marked(self, text: str) -> list[int]:
        """Ids of a text with `escape` marks: the unmarked special-token
        strings are control tokens (honouring their lstrip/rstrip), the text
        between them is unescaped and encoded as plain text, piece by piece."""
        ids, start, strip_left = [], 0, False
        pieces = []  # (text, control id or None)
        for m in (self._special_re.finditer(text) if self._special_re else ()):
            pieces.append((text[start:m.start()], None))
            pieces.append((m.group(0), self._special[m.group(0)][0]))
            start = m.end()
        pieces.append((text[start:], None))
        for k, (piece, control) in enumerate(pieces):
            if control is not None:
                ids.append(control)
                strip_left = self._special[piece][1].rstrip
                continue
            if strip_left:
                piece = piece.lstrip()
            if k + 1 < len(pieces) and self._special[pieces[k + 1][0]][1].lstrip:
                piece = piece.rstrip()
            if piece:
                ids += self._plain().encode(self.unescape(piece), add_special_tokens=False).ids
        return ids

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return list(ids)
        if self._bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        if ids and ids[0] == self._bos_id:
            return list(ids)
        return [self._bos_id, *ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (any int sequence or 1-D integer array)."""
        return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.hf_tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf_tokenizer.id_to_token(int(token_id))

    # -------------------------------------------------------------- chat format

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool, **kwargs: Any) -> str:
        """Renders `messages` with this checkpoint's own chat template.

        Returns a string (tokenize it with `encode(..., add_bos=self.add_bos)`;
        a BOS the template already wrote is not doubled). Extra keyword
        arguments are visible to the template. Special-token strings inside
        message contents (any string value of a message but its `role`) are
        marked with `escape` first, so `encode` makes them plain text while
        the template's own special tokens stay control tokens; text without
        such strings renders exactly as in transformers.

        Raises:
          ChatTemplateError (a ValueError): no template, the template raised
            (e.g. roles that do not alternate), or rendering failed in any
            other way (e.g. a message whose content is None); the message
            summarizes the messages and the original error is chained.
        """
        return chat_template_lib.render_chat_template(
            self.chat_template,
            [self._escape_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )

    def _escape_message(self, message):
        if not isinstance(message, dict):
            return message  # render_chat_template reports it
        return {k: v if k == "role" else self._escape_value(v) for k, v in message.items()}

    def _escape_value(self, value):
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, list):
            return [self._escape_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self._escape_value(v) for k, v in value.items()}
        return value

    def __repr__(self):
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, eos_id={self._eos_id}, "
            f"pad_id={self.pad_id}, add_bos={self.add_bos}, stop_ids={self._stop_ids}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )


def _has_mark(text) -> bool:
    return isinstance(text, str) and SPECIAL_ESCAPE in text


_BAD_TEXT = re.compile("[\ud800-\udfff]")


def _tokenizer_error(error: BaseException) -> bool:
    """What the Rust `tokenizers` library raises on bad text: an Exception
    (TypeError for a str it cannot take) or a pyo3 PanicException, which is
    a BaseException; not an interrupt, an exit or running out of memory."""
    return not isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError))


def _check_text(text) -> None:
    """Raises TokenizeError naming why `text` cannot be encoded, if it is not a
    str or not valid Unicode (a lone surrogate, e.g. from JSON "\\ud800")."""
    if not isinstance(text, str):
        raise TokenizeError("not text", f"got {type(text).__name__}")
    bad = _BAD_TEXT.search(text)
    if bad:
        raise TokenizeError("not valid Unicode",
                            f"lone surrogate U+{ord(bad.group(0)):04X} at character {bad.start()}")


def _token_content(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} (use "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        by_name = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return by_name.get("default", next(iter(by_name.values()), None))
    return None


def _post_processor_bos(processor: dict | None) -> int | None:
    """Id of the special token a tokenizer.json post-processor puts first, if any."""
    if not processor:
        return None
    kind = processor.get("type")
    if kind == "Sequence":
        for inner in processor.get("processors", []):
            found = _post_processor_bos(inner)
            if found is not None:
                return found
        return None
    if kind in ("BertProcessing", "RobertaProcessing"):
        return int(processor["cls"][1])
    if kind == "TemplateProcessing":
        single = processor.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            ids = processor.get("special_tokens", {}).get(name, {}).get("ids") or []
            if len(ids) == 1:
                return int(ids[0])
    return None
