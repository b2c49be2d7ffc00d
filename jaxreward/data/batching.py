"""Preference pairs -> fixed-shape token arrays, and a resumable batch iterator.

Layout of one row (right padding, T = max_length):

    [BOS] prompt tokens | response tokens [EOS] | pad ... pad
    attention_mask: True over prompt and response
    loss_mask:      True over response tokens and the appended EOS only
    positions:      0, 1, 2, ... over attended tokens, 0 on padding

With left padding the same tokens, masks and positions sit at the end of the
row. Prompt and response are tokenized separately and concatenated, so no
BPE merge crosses the boundary and the loss mask is exact.

Responses are plain text: a special-token string inside one ("<|im_end|>")
is encoded as text, never as a control token. Prompts keep the control
tokens their chat template wrote, and only those (see
`Tokenizer.apply_chat_template`). Text the tokenizer cannot encode drops
its pair, counted and located in the report.
"""
import dataclasses
from typing import Sequence

import numpy as np

from jaxreward.errors import UserError

SIDES = ("chosen", "rejected")
_EXAMPLES = 5


@dataclasses.dataclass
class TruncationReport:
    """How `tokenize_pairs` cut and dropped pairs.

    Counts are of pairs. `kept_indices[i]` is the index in the input of output
    row i.
    """

    num_pairs: int = 0
    num_kept: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    any_truncated: int = 0  # pairs with any cut (prompt or either response)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    dropped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    kept_indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros([0], np.int64))

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def _drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES:
            examples.append(where)

    def summary(self, unpaired: bool = False) -> str:
        """One line, e.g. "tokenized 100 pairs: kept 99, truncated 7 (prompt 3, chosen 4, ...)".
        `unpaired`: the rows are feedback lines tokenized as pairs with the
        completion on both sides, counted as lines with one completion."""
        cuts = (f"completion cut {self.chosen_truncated}" if unpaired else
                f"chosen cut {self.chosen_truncated}, rejected cut {self.rejected_truncated}")
        text = (
            f"tokenized {self.num_pairs} {'feedback lines' if unpaired else 'pairs'}: kept {self.num_kept}, "
            f"truncated {self.any_truncated} (prompt cut {self.prompt_truncated}, {cuts}), "
            f"dropped {self.num_dropped}"
        )
        if self.dropped:
            parts = [f"{r}: {n} [{', '.join(self.dropped_examples[r])}]" for r, n in sorted(self.dropped.items())]
            text += " (" + "; ".join(parts) + ")"
        return text


def tokenize_pairs(
    pairs: Sequence,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    append_eos: bool = True,
    padding_side: str = "right",
) -> tuple[dict[str, np.ndarray], TruncationReport]:
    """Tokenizes preference pairs into fixed-shape arrays.

    Each pair (anything with `.prompt`, `.chosen`, `.rejected` strings; a
    `.source` is used in the report) gives one row per side. The prompt is
    encoded once with `add_bos=tokenizer.add_bos` (one BOS; a BOS the chat
    template already wrote is not doubled) and shared by both sides; each
    response is encoded as plain text (`encode(..., plain=True)`: a
    special-token string in it is text) and gets `tokenizer.eos_id` appended
    when `append_eos`. A pair with text the tokenizer cannot encode (e.g. a
    lone surrogate) is dropped and reported ("cannot tokenize <field>: why").

    Truncation keeps the END of the prompt (and its BOS) and the START of the
    response. The prompt is cut from the left to `max_prompt_length`; by
    default that is `max(max_length // 2, max_length - longest response of
    the pair)`, so a short response leaves its room to the prompt. Each
    response is then cut from the right to `max_length - len(prompt)`. A pair
    is dropped when either response has zero tokens left (or had none).

    Args:
      pairs: N preference pairs.
      tokenizer: a `jaxreward.data.tokenizer.Tokenizer`.
      max_length: T, the row length.
      max_prompt_length: hard cap on prompt tokens (BOS included), >= 1.
      append_eos: append EOS to each response (inside the loss mask).
      padding_side: "right" or "left".

    Returns:
      (arrays, report). For s in ("chosen", "rejected"), with M kept pairs:
        `{s}_tokens` int32[M, T] (padding is `tokenizer.pad_id`),
        `{s}_attention_mask` bool[M, T], `{s}_loss_mask` bool[M, T],
        `{s}_positions` int32[M, T] (0.. from the first attended token, 0 on padding);
      and a `TruncationReport`.

    Raises:
      ValueError: bad `padding_side`, `max_length` < 2, `max_prompt_length` < 1,
        or `append_eos` without an EOS id.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if append_eos and tokenizer.eos_id is None:
        raise ValueError("append_eos=True but the tokenizer has no EOS id")
    eos = [tokenizer.eos_id] if append_eos else []
    prompts = _encode_each(tokenizer, [p.prompt for p in pairs], add_bos=tokenizer.add_bos)
    responses = {s: _encode_each(tokenizer, [getattr(p, s) for p in pairs], plain=True) for s in SIDES}

    report = TruncationReport(num_pairs=len(pairs))
    rows = {s: [] for s in SIDES}  # (tokens, prompt_length) per kept pair
    kept = []
    for i, pair in enumerate(pairs):
        where = getattr(pair, "source", None) or f"pair {i}"
        failed = next((f for f, ids in (("prompt", prompts[i]), *((s, responses[s][i]) for s in SIDES))
                       if isinstance(ids, Exception)), None)
        if failed is not None:
            error = prompts[i] if failed == "prompt" else responses[failed][i]
            report._drop(f"cannot tokenize {failed}: {_why(error)}", where)
            continue
        response = {s: responses[s][i] + eos for s in SIDES}
        if any(not response[s] for s in SIDES):
            side = next(s for s in SIDES if not response[s])
            report._drop(f"empty {side} response", where)
            continue
        prompt = prompts[i]
        limit = max_prompt_length
        if limit is None:
            limit = max(max_length // 2, max_length - max(len(r) for r in response.values()))
        prompt_cut = len(prompt) > limit
        if prompt_cut:
            # Keep a BOS in front only when we added it (the model wants one);
            # a chat template's own first token (SmolLM2's BOS is
            # <|im_start|>) is just text and is cut with the rest.
            prompt = _keep_end(prompt, limit, tokenizer.bos_id if tokenizer.add_bos else None)
        room = max_length - len(prompt)
        if room <= 0:
            report._drop("no room for the response after the prompt", where)
            continue
        cut = {s: len(response[s]) > room for s in SIDES}
        report.prompt_truncated += prompt_cut
        report.chosen_truncated += cut["chosen"]
        report.rejected_truncated += cut["rejected"]
        report.any_truncated += prompt_cut or any(cut.values())
        for s in SIDES:
            rows[s].append((prompt + response[s][:room], len(prompt)))
        kept.append(i)
    report.num_kept = len(kept)
    report.kept_indices = np.asarray(kept, np.int64)

    arrays = {}
    for s in SIDES:
        tokens, attention, loss, positions = _layout(rows[s], max_length, tokenizer.pad_id, padding_side)
        arrays[f"{s}_tokens"] = tokens
        arrays[f"{s}_attention_mask"] = attention
        arrays[f"{s}_loss_mask"] = loss
        arrays[f"{s}_positions"] = positions
    return arrays, report


def _encode_each(tokenizer, texts: list, **kwargs) -> list:
    """`tokenizer.encode_batch(texts)`, with the exception in place of the ids
    of each text that cannot be encoded (the batch is retried one by one)."""
    try:
        return tokenizer.encode_batch(texts, **kwargs)
    except ValueError:  # Tokenizer.encode_batch raises TokenizeError for bad text: find which
        out = []
        for text in texts:
            try:
                out.append(tokenizer.encode(text, **kwargs))
            except ValueError as e:  # reported per pair
                out.append(e)
        return out


def _why(error: Exception) -> str:
    """A short reason to count by (a TokenizeError's `reason`)."""
    return getattr(error, "reason", None) or type(error).__name__


def _keep_end(prompt: list[int], limit: int, bos: int | None) -> list[int]:
    """The last `limit` tokens of `prompt`, with its leading BOS kept in front."""
    if bos is not None and prompt and prompt[0] == bos:
        return [bos] + prompt[len(prompt) - (limit - 1):] if limit > 1 else [bos]
    return prompt[len(prompt) - limit:]


def _layout(rows, max_length, pad_id, padding_side):
    n = len(rows)
    tokens = np.full([n, max_length], pad_id, np.int32)
    attention = np.zeros([n, max_length], bool)
    loss = np.zeros([n, max_length], bool)
    positions = np.zeros([n, max_length], np.int32)
    for b, (row, prompt_length) in enumerate(rows):
        length = len(row)
        start = 0 if padding_side == "right" else max_length - length
        tokens[b, start:start + length] = row
        attention[b, start:start + length] = True
        loss[b, start + prompt_length:start + length] = True
        positions[b, start:start + length] = np.arange(length)
    return tokens, attention, loss, positions


class PairBatcher:
    """Endless, deterministic, resumable batches of rows from a dict of arrays.

    Epoch e visits rows in `np.random.default_rng([seed, e]).permutation(N)`
    order, `batch_size` at a time; with `drop_remainder` the last partial
    batch of each epoch is skipped (otherwise it is yielded smaller). Every
    batch is `{key: array[batch_size, ...]}`. `state()`/`restore()` give the
    position, so a restored batcher yields exactly what the original would have.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, drop_remainder: bool = True):
        """Raises ValueError: arrays of different lengths; UserError (a ValueError):
        fewer rows than one batch."""
        sizes = {len(v) for v in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays must have one leading size, got {sorted(sizes)}")
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.num_rows = sizes.pop()
        whole, rest = divmod(self.num_rows, batch_size)
        self.batches_per_epoch = whole + (rest > 0 and not drop_remainder)
        if self.batches_per_epoch == 0:
            raise UserError(f"{self.num_rows} rows make no batch of {batch_size}")
        self._epoch, self._index, self._order = 0, 0, None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self._epoch:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._order = (self._epoch, rng.permutation(self.num_rows))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self._index * self.batch_size
        rows = self._epoch_order()[start:start + self.batch_size]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return {key: value[rows] for key, value in self.arrays.items()}

    def state(self) -> dict[str, int]:
        """Position of the next batch: {"epoch": int, "index": batch within the epoch}."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a `state()`. Raises ValueError if the index is past the epoch."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index < self.batches_per_epoch or epoch < 0:
            raise ValueError(f"bad batcher state {state} ({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._index = epoch, index
