"""Rendering a checkpoint's own jinja2 chat template, the way HF transformers does.

A chat template is untrusted code shipped with a checkpoint, so it runs in
jinja2's immutable sandbox. The environment mirrors the one HF transformers
builds (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, a
`raise_exception` helper, a `tojson` filter that does not HTML-escape, and
`strftime_now`), so the same template renders to the same string here and in
`AutoTokenizer.apply_chat_template(..., tokenize=False)`.
"""
import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox

from jaxreward.errors import UserError


class ChatTemplateError(UserError):
    """A template is missing, does not compile, or raised while rendering (a `UserError`,
    hence a `ValueError`)."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's built-in tojson HTML-escapes '<', '>' and '&'; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles `template` in a sandboxed environment (cached per template string).

    Raises:
      ChatTemplateError: the template has a jinja2 syntax error.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from e


def render_chat_template(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs,
) -> str:
    """Renders `messages` (a list of {"role": ..., "content": ...} dicts) to one string.

    `bos_token`/`eos_token` are the special-token strings the template may
    reference; extra keyword arguments (e.g. `tools`) are passed to the template.

    Raises:
      ChatTemplateError: `template` is None or empty, does not compile, a
        message is not a dict, the template called `raise_exception` (e.g.
        roles that do not alternate), or rendering failed in any other way
        (e.g. a TypeError from `'...' + message['content']` when the content
        is None). The message says what failed and summarizes the messages
        (index, role, content type); the original error is chained.
    """
    if not template:
        raise ChatTemplateError(
            "this tokenizer has no chat template; pass one (e.g. from the checkpoint's "
            "tokenizer_config.json or chat_template.jinja) or render prompts yourself"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"message {i} is a {type(message).__name__}, expected a dict")
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token if bos_token is not None else "",
            eos_token=eos_token if eos_token is not None else "",
            **kwargs,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template raised: {e} [{_summary(messages)}]") from e
    except Exception as e:
        # The template is arbitrary code run on the caller's data: a TypeError
        # (None content), KeyError, ZeroDivisionError, ... all mean "this
        # template cannot render these messages".
        raise ChatTemplateError(
            f"chat template failed to render the messages: {type(e).__name__}: {e} [{_summary(messages)}]"
        ) from e


def _summary(messages: list[dict], limit: int = 8) -> str:
    """"0: role='user', content NoneType; ..." for the first `limit` messages."""
    parts = [f"{i}: role={m.get('role')!r}, content {type(m.get('content')).__name__}"
             for i, m in enumerate(messages[:limit])]
    if len(messages) > limit:
        parts.append(f"... ({len(messages)} messages)")
    return "messages " + "; ".join(parts) if parts else "no messages"
