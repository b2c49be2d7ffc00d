"""Reading preference pairs (prompt, chosen, rejected) from JSONL files.

Formats (detected per file from the first line that is a JSON object with a
`prompt` or `chosen` field, or forced with `fmt=`):

- "hh": Anthropic HH-RLHF transcripts, `{"chosen": str, "rejected": str}`,
  each `"\\n\\nHuman: ...\\n\\nAssistant: ..."`. The prompt is everything up
  to and including the last `"\\n\\nAssistant:"`; the response is the rest
  (with its leading space, which is how the text continues). With
  `hh_as_chat=True` the prompt turns become chat messages rendered by
  `render_chat(messages, add_generation_prompt=True)`, and the response is the
  final assistant text without the one space HH puts after `Assistant:`.
- "trl": TRL explicit-prompt strings, `{"prompt": str, "chosen": str, "rejected": str}`.
- "trl_chat": TRL explicit-prompt messages: `prompt` is a list of
  `{"role", "content"}` messages, `chosen`/`rejected` each a list holding one
  assistant message. The prompt is rendered with `render_chat`.
- "trl_implicit": TRL implicit prompt: `chosen`/`rejected` are whole
  conversations (message lists) that share every message but the final
  assistant one; the shared prefix is the prompt.

For chat formats the response is the assistant's plain text; the end of the
turn is the EOS that `tokenize_pairs(append_eos=True)` appends.

Every bad line is reported with its file, line number and field. With
`on_error="skip"` it is dropped and counted by reason in a `ReadReport`.
Besides malformed lines that includes text no tokenizer should see (a lone
surrogate such as JSON "\\ud800", which is not valid Unicode, or a NUL
character) and chat messages whose role is not system, user, assistant or
tool. A file with no records is an error too ("empty file").
"""
import dataclasses
import gzip
import zlib
import json
import pathlib
import re
from typing import Callable

import jinja2

from jaxreward.errors import UserError

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
FORMATS = ("hh", "trl", "trl_chat", "trl_implicit")
_EXAMPLES_PER_REASON = 5
ROLES = ("system", "user", "assistant", "tool")  # chat roles of TRL's conversational formats
TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion", "response", "answer")
_BAD_CHAR = re.compile("[\x00\ud800-\udfff]")

RenderChat = Callable[..., str]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One preference pair; `prompt + chosen` is the preferred text.

    `source` is "file:line" (file name only, line numbers from 1). `subset`
    is the line's optional `subset` string (RewardBench-style), else None.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str
    subset: str | None = None


class DataError(UserError):
    """A bad line in a data file (a `UserError`, hence a `ValueError`). Its
    message is "path:line: field 'f': reason (detail)".

    Attributes: path, line (1-based), field (None when the whole line is bad),
    reason (a short fixed label such as "prompt mismatch"), label (the reason
    with its field, as counted in `ReadReport`).
    """

    def __init__(self, path: str, line: int, field: str | None, reason: str, detail: str = ""):
        self.path, self.line, self.field, self.reason, self.detail = path, line, field, reason, detail
        where = f"{path}:{line}: " + (f"field '{field}': " if field else "")
        super().__init__(where + reason + (f" ({detail})" if detail else ""))

    @property
    def label(self) -> str:
        return _label(self.reason, self.field)


def _label(reason: str, field: str | None) -> str:
    if reason == "empty response":
        return f"empty {field} response"
    joins = {"missing field": "", "wrong type": " of", "bad message": " in", "bad role": " in",
             "bad text": " in"}
    if field and reason in joins:
        return f"{reason}{joins[reason]} '{field}'"
    return reason


class _Bad(Exception):
    """Raised by the per-format parsers; turned into a DataError with file and line."""

    def __init__(self, field: str | None, reason: str, detail: str = ""):
        super().__init__(reason)
        self.field, self.reason, self.detail = field, reason, detail


def _counted(counts: dict, examples: dict) -> str:
    """"label: count [file:line, ...]" per label, most frequent first, "; "-joined."""
    parts = []
    for label, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        shown = examples[label]
        parts.append(f"{label}: {count} [{', '.join(shown)}{', ...' if count > len(shown) else ''}]")
    return "; ".join(parts)


@dataclasses.dataclass
class ReadReport:
    """What `read_preference_pairs` read, kept and skipped (by reason)."""

    path: str
    fmt: str | None = None
    lines: int = 0  # non-blank lines read
    kept: int = 0
    blank: int = 0  # blank lines, ignored and not counted as errors
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> count
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # label -> ["file:line"]
    # prompts_only=True: lines kept for their prompt alone (counted in `kept`), label -> count / examples.
    prompt_only: dict[str, int] = dataclasses.field(default_factory=dict)
    prompt_only_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_error(self, error: DataError, source: str) -> None:
        self.skipped[error.label] = self.skipped.get(error.label, 0) + 1
        examples = self.examples.setdefault(error.label, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(source)

    def add_prompt_only(self, error: "DataError", source: str) -> None:
        self.prompt_only[error.label] = self.prompt_only.get(error.label, 0) + 1
        examples = self.prompt_only_examples.setdefault(error.label, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(source)

    def summary(self) -> str:
        """One line, e.g. "read 10 lines (hh): kept 8, skipped 2 (prompt mismatch: 2 [f:3, f:7]);
        1 blank line ignored"."""
        text = f"{self.path}: read {self.lines} lines ({self.fmt or 'format unknown'}): kept {self.kept}"
        if self.prompt_only:
            text += (f" ({sum(self.prompt_only.values())} for the prompt only: "
                     + _counted(self.prompt_only, self.prompt_only_examples) + ")")
        text += f", skipped {self.num_skipped}"
        if self.skipped:
            text += " (" + _counted(self.skipped, self.examples) + ")"
        if self.blank:
            text += f"; {self.blank} blank line{'s' if self.blank > 1 else ''} ignored"
        return text


def read_preference_pairs(
    path: str | pathlib.Path,
    *,
    fmt: str = "auto",
    on_error: str = "skip",
    render_chat: RenderChat | None = None,
    hh_as_chat: bool = False,
    prompts_only: bool = False,
) -> tuple[list[PreferencePair], ReadReport]:
    """Reads preference pairs from a `.jsonl` or `.jsonl.gz` file.

    Args:
      path: the file; `.gz` files are decompressed.
      fmt: "auto" (detect from the first line that is a valid record of the
        format its fields suggest: a bad first line does not decide it),
        or one of "hh", "trl", "trl_chat", "trl_implicit" (see module doc).
      on_error: "skip" drops bad lines and counts them in the report;
        "raise" raises on the first bad line.
      render_chat: `render_chat(messages, add_generation_prompt=True) -> str`,
        normally `tokenizer.apply_chat_template`; needed for chat formats and
        for `hh_as_chat`.
      hh_as_chat: render HH transcripts' prompts as chat (see module doc).
      prompts_only: for a reader of the prompts alone (e.g. the prompts of
        VAS or the RL drivers): a line whose only fault is in its responses
        (an empty response, or a prompt mismatch, where the prompt is taken
        from `chosen`) is kept with its prompt and empty responses, and
        counted in the report (`prompt_only`). Pair readers (reward model,
        DPO) leave it False.

    Returns:
      (pairs, report): the valid pairs in file order, and a `ReadReport`.

    Raises:
      DataError (a ValueError): with on_error="raise", the first bad line,
        naming file:line and field. Reasons: malformed JSON (with the
        column), not UTF-8, not a JSON object, missing field, wrong type,
        bad message, bad role, bad text (a lone surrogate or NUL character), no assistant turn, malformed
        transcript, empty prompt, empty response, prompt mismatch, chat
        template error, empty file (no records; with on_error="skip" it is
        counted in the report).
      UserError (a ValueError): chat content without `render_chat`, or a
        `path` that is a folder.
      ValueError: bad `fmt`/`on_error`.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"fmt must be 'auto' or one of {FORMATS}, got {fmt!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    path = pathlib.Path(path)
    check_not_a_folder(path)
    name = path.name
    report = ReadReport(path=name, fmt=None if fmt == "auto" else fmt)
    pairs = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in numbered_lines(f, path, on_error, report):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            if not raw.strip():
                report.blank += 1
                continue
            report.lines += 1
            source = f"{name}:{lineno}"
            fmt = report.fmt
            try:
                obj = _parse_json(raw)
                if report.fmt is None:
                    report.fmt = _detect(obj)
                    if report.fmt is None:
                        raise _Bad("chosen", "missing field", "cannot detect the format without it")
                _check_render(report.fmt, hh_as_chat, render_chat, path)
                prompt, chosen, rejected = _PARSERS[report.fmt](obj, render_chat, hh_as_chat)
                subset = _field(obj, "subset", str) if "subset" in obj else None
            except _Bad as bad:
                error = DataError(str(path), lineno, bad.field, bad.reason, bad.detail)
                if prompts_only and bad.reason in ("empty response", "prompt mismatch"):
                    try:
                        prompt = _PROMPT_PARSERS[report.fmt](obj, render_chat, hh_as_chat)
                    except _Bad:
                        prompt = None
                    if prompt is not None:
                        pairs.append(PreferencePair(prompt, "", "", source, None))
                        report.kept += 1
                        report.add_prompt_only(error, source)
                        continue
                report.fmt = fmt  # a bad line does not decide the format of the lines after it
                if on_error == "raise":
                    raise error from None
                report.add_error(error, source)
                continue
            pairs.append(PreferencePair(prompt, chosen, rejected, source, subset))
            report.kept += 1
    if report.lines == 0 and not report.skipped:
        error = DataError(str(path), 1, None, "empty file", "no records")
        if on_error == "raise":
            raise error
        report.add_error(error, f"{name}:1")
    return pairs, report


def check_not_a_folder(path) -> None:
    """A data path that is a folder is a `UserError` naming it (opening it would
    raise IsADirectoryError, a traceback rather than one line)."""
    if pathlib.Path(path).is_dir():
        raise UserError(f"{path}: is a folder, not a data file (give the .jsonl / .jsonl.gz file in it)")


def numbered_lines(f, path: pathlib.Path, on_error: str, report: "ReadReport"):
    """(line number, bytes) of a file. A corrupt or truncated (gzip) stream is
    a `DataError` naming the file and the line it broke at: raised with
    on_error="raise", else counted in the report, keeping every pair before it.
    """
    lineno = 0
    try:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, raw
    except (OSError, EOFError, zlib.error) as e:
        what = ("not a gzip file" if isinstance(e, gzip.BadGzipFile) and lineno == 0
                else "corrupt or truncated file")
        error = DataError(str(path), lineno + 1, None, what, str(e))
        if on_error == "raise":
            raise error from e
        report.add_error(error, f"{path.name}:{lineno + 1}")


def parse_record(raw: bytes, path: str, lineno: int) -> dict:
    """One JSON-object line with valid text, as every reader here checks it:
    UTF-8 JSON, an object, and no lone surrogate or NUL character in any
    text field (`TEXT_FIELDS`, also inside message lists).

    Raises:
      DataError: "malformed JSON", "not UTF-8", "not a JSON object" or "bad text", naming `path:lineno` and the field.
    """
    try:
        return _parse_json(raw)
    except _Bad as bad:
        raise DataError(path, lineno, bad.field, bad.reason, bad.detail) from None


def check_messages(value: list, key: str, path: str, lineno: int) -> list[dict]:
    """Chat messages `[{"role", "content"}, ...]` with roles from `ROLES`.

    Raises:
      DataError: "bad message" or "bad role", naming `path:lineno`, `key` and the message index.
    """
    try:
        return _messages(value, key)
    except _Bad as bad:
        raise DataError(path, lineno, bad.field, bad.reason, bad.detail) from None


def _decode_line(raw: bytes) -> str:
    """One line's text without its line ending; bytes that are not UTF-8 are
    "not UTF-8", naming the first bad byte and its column (1-based, in
    characters, as for malformed JSON: the bytes before it decode)."""
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        column = len(raw[:e.start].decode("utf-8")) + 1
        raise _Bad(None, "not UTF-8", f"byte 0x{raw[e.start]:02x} at column {column}: {e.reason}") from None


def _parse_json(raw: bytes):
    # The line ending is removed first: json counts lines and columns from
    # the text it is given, so with "\n" left on, a record cut short reads
    # "line 2 column 1" although the fault is at the end of this line. The
    # file's line is the DataError's; the detail names the column in it.
    text = _decode_line(raw)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(None, "malformed JSON", f"{e.msg} at column {e.pos + 1}") from None
    if not isinstance(obj, dict):
        raise _Bad(None, "not a JSON object", f"got {type(obj).__name__}")
    for key in TEXT_FIELDS:
        if key in obj:
            _check_text(obj[key], key)
    return obj


def _check_text(value, key: str) -> None:
    """Text fields (strings, also inside message lists) hold valid Unicode
    without NUL: a lone surrogate cannot be encoded at all, a NUL is binary
    junk that tokenizers and templates handle inconsistently."""
    if isinstance(value, str):
        bad = _BAD_CHAR.search(value)
        if bad:
            char = bad.group(0)
            what = ("NUL character" if char == "\x00"
                    else f"lone surrogate U+{ord(char):04X}, not valid Unicode")
            raise _Bad(key, "bad text", f"{what} at character {bad.start()}")
    elif isinstance(value, list):
        for item in value:
            _check_text(item, key)
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item, key)


def _detect(obj: dict) -> str | None:
    if "prompt" in obj:
        return "trl_chat" if isinstance(obj["prompt"], list) else "trl"
    if "chosen" in obj:
        return "trl_implicit" if isinstance(obj["chosen"], list) else "hh"
    return None


def _check_render(fmt, hh_as_chat, render_chat, path):
    needs = fmt in ("trl_chat", "trl_implicit") or (fmt == "hh" and hh_as_chat)
    if needs and render_chat is None:
        what = f"holds chat messages ({fmt})" if fmt != "hh" else "is read with hh_as_chat=True"
        raise UserError(f"{path}: this file {what}, which needs a chat template: pass "
                        "render_chat=tokenizer.apply_chat_template (a tokenizer with a template)")


def _field(obj: dict, key: str, kind: type):
    if key not in obj:
        raise _Bad(key, "missing field")
    value = obj[key]
    if not isinstance(value, kind):
        raise _Bad(key, "wrong type", f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _require_responses(chosen: str, rejected: str) -> None:
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise _Bad(key, "empty response")


def _render(render_chat, messages):
    try:
        return render_chat(messages, add_generation_prompt=True)
    except (ValueError, jinja2.exceptions.TemplateError) as e:
        raise _Bad("prompt", "chat template error", str(e)) from None


# ------------------------------------------------------------------ HH-RLHF


def _split_hh(text: str, key: str) -> tuple[str, str]:
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Bad(key, "no assistant turn", "no '\\n\\nAssistant:' in the transcript")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _hh_messages(prompt: str) -> list[dict]:
    """HH prompt text (ending in "\\n\\nAssistant:") -> messages, minus the open final turn."""
    parts = _HH_TURN.split(prompt)
    if parts[0].strip():
        raise _Bad("chosen", "malformed transcript", "text before the first Human/Assistant turn")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _HH_ROLES[role], "content": _strip_one_space(content)})
    return messages[:-1]  # the last "Assistant:" is the turn the response fills


def _strip_one_space(text: str) -> str:
    return text[1:] if text.startswith(" ") else text


def _parse_hh(obj, render_chat, hh_as_chat):
    chosen_text, rejected_text = _field(obj, "chosen", str), _field(obj, "rejected", str)
    prompt, chosen = _split_hh(chosen_text, "chosen")
    rejected_prompt, rejected = _split_hh(rejected_text, "rejected")
    if prompt != rejected_prompt:
        raise _Bad("rejected", "prompt mismatch", "the transcripts differ before the last Assistant turn")
    if not _HH_TURN.sub("", prompt).strip():
        raise _Bad("chosen", "empty prompt", "no text in the turns before the last reply")
    _require_responses(chosen, rejected)
    if not hh_as_chat:
        return prompt, chosen, rejected
    messages = _hh_messages(prompt)
    return _render(render_chat, messages), _strip_one_space(chosen), _strip_one_space(rejected)


# ---------------------------------------------------------------------- TRL


def _parse_trl(obj, render_chat, hh_as_chat):
    del render_chat, hh_as_chat
    prompt = _field(obj, "prompt", str)
    chosen, rejected = _field(obj, "chosen", str), _field(obj, "rejected", str)
    if not prompt.strip():
        raise _Bad("prompt", "empty prompt")
    _require_responses(chosen, rejected)
    return prompt, chosen, rejected


def _messages(value: list, key: str) -> list[dict]:
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Bad(key, "bad message", f"message {i} is not a {{'role', 'content'}} dict")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise _Bad(key, "bad message", f"message {i}: role and content must be strings")
        if message["role"] not in ROLES:
            raise _Bad(key, "bad role", f"message {i}: role {message['role']!r} is not one of "
                                        f"{', '.join(ROLES)}")
    return value


def _assistant_reply(messages: list[dict], key: str, reason: str = "bad message") -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise _Bad(key, reason, f"expected one final assistant message, got roles {roles}")
    return messages[0]["content"]


def _parse_trl_chat(obj, render_chat, hh_as_chat):
    del hh_as_chat
    prompt = _messages(_field(obj, "prompt", list), "prompt")
    chosen = _assistant_reply(_messages(_field(obj, "chosen", list), "chosen"), "chosen")
    rejected = _assistant_reply(_messages(_field(obj, "rejected", list), "rejected"), "rejected")
    if not prompt:
        raise _Bad("prompt", "empty prompt")
    _require_responses(chosen, rejected)
    return _render(render_chat, prompt), chosen, rejected


def _parse_trl_implicit(obj, render_chat, hh_as_chat):
    del hh_as_chat
    chosen = _messages(_field(obj, "chosen", list), "chosen")
    rejected = _messages(_field(obj, "rejected", list), "rejected")
    if not chosen:
        raise _Bad("chosen", "empty response", "empty conversation")
    if not rejected:
        raise _Bad("rejected", "empty response", "empty conversation")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)  # the last message is always a reply
    chosen_reply = _assistant_reply(chosen[shared:], "chosen", "prompt mismatch")
    rejected_reply = _assistant_reply(rejected[shared:], "rejected", "prompt mismatch")
    if shared == 0:
        raise _Bad("chosen", "empty prompt", "the conversations share no message")
    _require_responses(chosen_reply, rejected_reply)
    return _render(render_chat, chosen[:shared]), chosen_reply, rejected_reply


_PARSERS = {
    "hh": _parse_hh,
    "trl": _parse_trl,
    "trl_chat": _parse_trl_chat,
    "trl_implicit": _parse_trl_implicit,
}


# ------------------------------------------------------ prompts of bad pairs


def _prompt_hh(obj, render_chat, hh_as_chat):
    prompt, _ = _split_hh(_field(obj, "chosen", str), "chosen")
    if not _HH_TURN.sub("", prompt).strip():
        raise _Bad("chosen", "empty prompt")
    return _render(render_chat, _hh_messages(prompt)) if hh_as_chat else prompt


def _prompt_trl(obj, render_chat, hh_as_chat):
    prompt = _field(obj, "prompt", str)
    if not prompt.strip():
        raise _Bad("prompt", "empty prompt")
    return prompt


def _prompt_trl_chat(obj, render_chat, hh_as_chat):
    prompt = _messages(_field(obj, "prompt", list), "prompt")
    if not prompt:
        raise _Bad("prompt", "empty prompt")
    return _render(render_chat, prompt)


def _prompt_trl_implicit(obj, render_chat, hh_as_chat):
    chosen = _messages(_field(obj, "chosen", list), "chosen")
    if len(chosen) < 2 or chosen[-1]["role"] != "assistant":
        raise _Bad("chosen", "empty prompt")
    return _render(render_chat, chosen[:-1])


# The prompt of a line whose responses are at fault (`read_preference_pairs(prompts_only=True)`).
_PROMPT_PARSERS = {
    "hh": _prompt_hh,
    "trl": _prompt_trl,
    "trl_chat": _prompt_trl_chat,
    "trl_implicit": _prompt_trl_implicit,
}
