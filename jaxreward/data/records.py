"""Readers for the record kinds beyond preference pairs: feedback, prompts, ratings.

Same contract as `preference.read_preference_pairs`: `.jsonl` / `.jsonl.gz`
(a UTF-8 byte-order mark is fine, blank lines are ignored), every bad line is
a `DataError` naming file:line and field, `on_error="skip"` counts it by
reason in a `ReadReport` and keeps every valid record, `on_error="raise"`
stops at the first one. A file with no records is an error too ("empty
file"): raised under "raise", else counted so the report says so.

- `read_feedback`: TRL unpaired preference, `{"prompt", "completion", "label": bool}`
  with strings ("trl") or messages ("trl_chat": `prompt` a message list
  rendered with `render_chat(messages, add_generation_prompt=True)`,
  `completion` a list holding one assistant message).
- `read_prompts`: `{"prompt": str | messages, "answer": str (optional)}`, or a
  `.txt` / `.txt.gz` file with one prompt per line.
- `read_rated`: `{"prompt": str | messages, "response": str}` plus K ratings,
  either a `ratings` list of K numbers or one numeric field per name in
  `attributes` (HelpSteer style).
"""
import dataclasses
import gzip
import math
import pathlib
from typing import Callable, Sequence

from jaxreward.data.preference import (
    DataError, ReadReport, RenderChat, _assistant_reply, _Bad, _check_text, _decode_line, _field, _messages,
    check_not_a_folder, numbered_lines, _parse_json, _render)
from jaxreward.errors import UserError


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
    """One unpaired judgement: `label` True when `completion` is a good reply to `prompt`."""

    prompt: str
    completion: str
    label: bool
    source: str  # "file:line"


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt, with an optional reference answer (None when absent)."""

    prompt: str
    answer: str | None
    source: str


@dataclasses.dataclass(frozen=True)
class RatedRecord:
    """A response with K numeric ratings (in `attributes` order when named)."""

    prompt: str
    response: str
    ratings: tuple[float, ...]
    source: str


def read_feedback(path, *, on_error: str = "skip", render_chat: RenderChat | None = None):
    """Reads TRL unpaired-preference lines -> (list[FeedbackRecord], ReadReport).

    Raises:
      DataError: with on_error="raise", the first bad line. Reasons: malformed
        JSON, not UTF-8, not a JSON object, missing field, wrong type (`label` must be a
        JSON bool), bad message, empty prompt, empty response, chat template
        error, empty file.
      ValueError: bad `on_error`.
      UserError (a ValueError): message lists without `render_chat`, naming file:line.
    """
    def parse(obj, report):
        if report.fmt is None:
            report.fmt = "trl_chat" if isinstance(obj.get("prompt"), list) else "trl"
        label = _field(obj, "label", bool)
        if report.fmt == "trl":
            prompt, completion = _field(obj, "prompt", str), _field(obj, "completion", str)
        else:
            prompt = _chat_prompt(_field(obj, "prompt", list), render_chat)
            completion = _assistant_reply(_messages(_field(obj, "completion", list), "completion"), "completion")
        if not prompt.strip():
            raise _Bad("prompt", "empty prompt")
        if not completion.strip():
            raise _Bad("completion", "empty response")
        return lambda source: FeedbackRecord(prompt, completion, label, source)

    return _read(path, parse, on_error)


def read_prompts(path, *, on_error: str = "skip", render_chat: RenderChat | None = None):
    """Reads prompts -> (list[PromptRecord], ReadReport); fmt "jsonl" or "txt".

    A `.txt[.gz]` file holds one prompt per line (line ending removed, other
    whitespace kept, no answer; a line with a NUL character is "bad text",
    as in `.jsonl`). In `.jsonl`, `prompt` is a string or a
    message list (rendered with a generation prompt); `answer`, when
    present, must be a non-empty string.

    Raises:
      DataError: with on_error="raise", the first bad line (malformed JSON,
        not UTF-8, missing field, wrong type, bad message, empty prompt, empty
        text (answer), chat template error, empty file).
      ValueError: bad `on_error`.
      UserError (a ValueError): message lists without `render_chat`, naming file:line.
    """
    if _is_txt(path):
        def parse_txt(raw: bytes, report):
            report.fmt = "txt"
            text = _decode_line(raw)  # "not UTF-8" as in .jsonl
            _check_text(text, "prompt")  # a NUL, as in .jsonl prompts
            return lambda source: PromptRecord(text, None, source)

        return _read(path, parse_txt, on_error, json_lines=False)

    def parse(obj, report):
        report.fmt = "jsonl"
        value = obj.get("prompt")
        prompt = _chat_prompt(value, render_chat) if isinstance(value, list) else _field(obj, "prompt", str)
        if not prompt.strip():
            raise _Bad("prompt", "empty prompt")
        answer = _field(obj, "answer", str) if "answer" in obj else None
        if answer is not None and not answer.strip():
            raise _Bad("answer", "empty text")
        return lambda source: PromptRecord(prompt, answer, source)

    return _read(path, parse, on_error)


def read_rated(
    path,
    *,
    attributes: Sequence[str] | None = None,
    num_ratings: int | None = None,
    on_error: str = "skip",
    render_chat: RenderChat | None = None,
):
    """Reads rated responses -> (list[RatedRecord], ReadReport); fmt "attributes" or "ratings".

    Args:
      attributes: names of K numeric fields, read in this order (HelpSteer:
        ("helpfulness", "correctness", "coherence", "complexity", "verbosity")).
        Without it each line has a `ratings` list.
      num_ratings: K for `ratings` lists; default: the length in the first
        valid line. Must equal len(attributes) when both are given.

    Raises:
      DataError: with on_error="raise", the first bad line: a missing
        attribute ("missing field 'helpfulness'"), a non-numeric or
        non-finite value ("bad rating", naming the field), a `ratings` list of
        the wrong length ("wrong ratings count"), and the reasons of
        `read_prompts` for `prompt`; an empty `response` is "empty text".
      ValueError: bad arguments.
      UserError (a ValueError): message lists without `render_chat`, naming file:line.
    """
    if attributes is not None:
        attributes = tuple(attributes)
        if not attributes or (num_ratings is not None and num_ratings != len(attributes)):
            raise ValueError(f"attributes={attributes} must be non-empty and match num_ratings={num_ratings}")
    expected = [len(attributes) if attributes else num_ratings]

    def parse(obj, report):
        report.fmt = "attributes" if attributes else "ratings"
        value = obj.get("prompt")
        prompt = _chat_prompt(value, render_chat) if isinstance(value, list) else _field(obj, "prompt", str)
        if not prompt.strip():
            raise _Bad("prompt", "empty prompt")
        response = _field(obj, "response", str)
        if not response.strip():
            raise _Bad("response", "empty text")
        if attributes:
            ratings = tuple(_number(name, _field(obj, name, object)) for name in attributes)
        else:
            values = _field(obj, "ratings", list)
            if expected[0] is not None and len(values) != expected[0]:
                raise _Bad("ratings", "wrong ratings count", f"expected {expected[0]}, got {len(values)}")
            ratings = tuple(_number(f"ratings[{i}]", v) for i, v in enumerate(values))
            if not ratings:
                raise _Bad("ratings", "wrong ratings count", "empty list")
            expected[0] = len(ratings)
        return lambda source: RatedRecord(prompt, response, ratings, source)

    return _read(path, parse, on_error)


# ------------------------------------------------------------------ helpers


def _number(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(field, "bad rating", f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise _Bad(field, "bad rating", f"not finite: {value!r}")
    if abs(value) > _FLOAT32_MAX:  # finite here, inf once the trainer casts it to float32
        raise _Bad(field, "bad rating", f"{value!r} is beyond the float32 range (|x| <= {_FLOAT32_MAX:.4g})")
    return float(value)


_FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max


def _chat_prompt(value, render_chat) -> str:
    messages = _messages(value, "prompt")
    if not messages:
        raise _Bad("prompt", "empty prompt")
    if render_chat is None:
        raise _NoTemplate()
    return _render(render_chat, messages)


class _NoTemplate(Exception):
    """A message list met without `render_chat`; `_read` names the file and line."""


def _is_txt(path) -> bool:
    name = pathlib.Path(path).name
    return name.endswith(".txt") or name.endswith(".txt.gz")


def check_not_empty(report: ReadReport, path, on_error: str) -> None:
    """A file with no records (no line, or only blank lines) is a `DataError` "empty file":
    raised with on_error="raise", else counted in `report` (so its summary says it)."""
    if report.lines == 0 and not report.skipped:
        error = DataError(str(path), 1, None, "empty file", "no records")
        if on_error == "raise":
            raise error
        report.add_error(error, f"{pathlib.Path(path).name}:1")


def _read(path, parse: Callable, on_error: str, json_lines: bool = True):
    """The line loop shared by the readers: `parse(obj or raw bytes, report)`
    returns `make(source) -> record` or raises `_Bad`."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    path = pathlib.Path(path)
    check_not_a_folder(path)
    report = ReadReport(path=path.name)
    records = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in numbered_lines(f, path, on_error, report):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                report.blank += 1
                continue
            report.lines += 1
            fmt = report.fmt
            try:
                make = parse(_parse_json(raw) if json_lines else raw, report)
            except _NoTemplate:  # the whole file needs a template, not this line alone: stop
                raise UserError(f"{path}:{lineno}: this file holds chat messages, which need a chat "
                                "template: use a tokenizer with one (pass render_chat="
                                "tokenizer.apply_chat_template)") from None
            except _Bad as bad:
                report.fmt = fmt  # a bad line does not decide the format of the lines after it
                error = DataError(str(path), lineno, bad.field, bad.reason, bad.detail)
                if on_error == "raise":
                    raise error from None
                report.add_error(error, f"{path.name}:{lineno}")
                continue
            records.append(make(f"{path.name}:{lineno}"))
            report.kept += 1
    check_not_empty(report, path, on_error)
    return records, report
