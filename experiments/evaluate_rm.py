"""Evaluate a reward model on preference files, without training (configs/evaluate_rm.py).

    python -m jaxreward.main --config=configs/evaluate_rm.py:exported --workdir=DIR \
        --config.scorer.reward_model_dir=RM_RUN/reward_model --config.data.paths=FILE.jsonl

Scorers (`scorer.kind`), each mapping (prompt, response) to one number:
  exported: a reward model exported by the reward_model job
    (`models/reward_io.load_reward_model`), objective `scorer.objective`;
    or an ensemble export (`reward_ensemble/`), its members combined per
    sequence by `ensemble.aggregate` (mean | min | mean_minus_std, λ =
    `ensemble.std_coef`).
  implicit: the DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) of a
    policy and its reference (summed over response tokens + EOS, or
    averaged with `scorer.length_normalize`).
  text: a Python text reward registered in `jaxreward/rewards` by name.

Data (`data.paths`, one or more `.jsonl[.gz]` files; one kind per file):
  pairs: any format `read_preference_pairs` reads (HH, TRL, ...), with an
    optional `subset` string per line; or, with `data.source="tfds"`, the
    TFDS dataset `jaxreward_pairs/<data.tfds_name>_<i>` built from file i.
  best-of rows (RewardBench 2): `{"prompt": str | messages, "chosen": str,
    "rejected": [str, ...], "subset": str}` — a file whose first JSON line has
    a string `chosen` and a list `rejected`. J rejected → best-of-(J+1).
Prompts are rendered with the chat template of the scorer's tokenizer
(`data.hh_as_chat` for HH transcripts), as the reward_model job does; use
the training run's `data.*` reading options to score what it trained on.

Report (arithmetic in `jaxreward/train/rewardbench.py`): a pair is correct
when chosen > rejected STRICTLY (a tie is wrong); a best-of row earns
1/(number tied at the top) when the chosen is among the top, else 0. Per
subset: accuracy = mean credit; per section (`report.sections`: section ->
subsets; default one section per file): subset accuracies weighted by their
row counts; overall: the unweighted mean over sections. All with 95% Wilson
intervals. A line without `subset` counts as subset "default" when no
sections are configured, and is an error (file, line, field) when they are.

Writes to the workdir: `evaluation.json` (the report), `scores.jsonl` (one
line per row: file, line, subset, kind, chosen, rejected, correct),
`subset_accuracy.png` (bars with interval error bars), and prints the tables.

The job, top to bottom: tokenizer (for chat rendering) -> read rows ->
subsets and sections -> load the scorer -> score every response -> credits
-> report -> write.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreward import parallel, rewards
from jaxreward.data.batching import tokenize_pairs
from jaxreward.data.preference import (DataError, PreferencePair, ReadReport, check_messages, numbered_lines,
                                       parse_record, read_preference_pairs)
from jaxreward.errors import CorruptFileError, UserError
from jaxreward.models import ensemble as ensemble_lib
from jaxreward.objectives.reward import ensemble_reward
from jaxreward.train import defaults, evaluate, rewardbench
from jaxreward.train import metrics as metrics_lib

KINDS = ("exported", "implicit", "text")
DEFAULT_SUBSET = "default"  # subset of a line without one (only when report.sections is empty)
PLOT_FILE = "subset_accuracy.png"


@dataclasses.dataclass(frozen=True)
class Row:
    """One example: a prompt and its responses, the chosen one first.

    `best_of` is False for a pair (its `rejected` was a string: ties are
    wrong) and True for a best-of-(J+1) row (a `rejected` list: ties share
    the credit).
    """

    prompt: str
    responses: tuple[str, ...]  # (chosen, rejected_1, ..., rejected_J)
    file: str                   # the data.paths entry it came from
    line: int                   # 1-based line in that file
    subset: str | None
    best_of: bool

    @property
    def kind(self) -> str:
        return f"best_of_{len(self.responses)}" if self.best_of else "pair"


# ----------------------------------------------------------------- config


def data_paths(config) -> tuple[str, ...]:
    """`data.paths` as a tuple (a single string is one file)."""
    paths = config.data.paths
    return (paths,) if isinstance(paths, str) else tuple(paths)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    s = config.scorer
    defaults.check_choice(config, "scorer.kind", KINDS)
    defaults.check_choice(config, "data.source", ("jsonl", "tfds"))
    paths = data_paths(config)
    if not paths:
        raise defaults.ConfigError("config field data.paths is empty: set --config.data.paths=FILE.jsonl "
                                   "(repeat the flag for more files)")
    for i, path in enumerate(paths):
        if not isinstance(path, str) or not os.path.isfile(path):
            raise defaults.ConfigError(f"config field data.paths[{i}]: {path!r} is not a file")
    if len(set(map(os.path.abspath, paths))) != len(paths):
        raise defaults.ConfigError(f"config field data.paths lists a file twice: {paths}")
    defaults.check_int(config, "data.max_rows", 0)
    # data.max_prompt_length < data.max_length: defaults.check_common.
    if s.kind == "exported":
        defaults.check_path(config, "scorer.reward_model_dir", required=True)
        ensemble_lib.check_export_dir(config, "scorer.reward_model_dir")
        ensemble_lib.check_config_block(config)
        defaults.check_int(config, "scorer.objective", 0)
    elif s.kind == "implicit":
        _check_model(config, "scorer.policy")
        _check_model(config, "scorer.reference")
        defaults.check_float(config, "scorer.beta", 0.0, low_open=True)
    else:
        try:
            rewards.get(s.text_reward)
        except KeyError as e:
            raise defaults.ConfigError(f"config field scorer.text_reward: {e.args[0]}") from None
    if s.tokenizer:
        _check_model(config, "scorer.tokenizer")
    for name, subsets in config.report.sections.items():
        if (isinstance(subsets, str) or not isinstance(subsets, (list, tuple)) or not subsets
                or not all(isinstance(x, str) and x for x in subsets)):
            raise defaults.ConfigError(f"config field report.sections.{name} must be a non-empty list "
                                       f"of subset names, got {subsets!r}")


def _check_model(config, name: str) -> None:
    """`name` is an existing HF dir / .gguf file or a known model name."""
    from jaxreward.models import pretrained
    value = defaults.get_field(config, name)
    if not value:
        raise defaults.ConfigError(f"config field {name} is empty: set --config.{name}=PATH_OR_NAME")
    try:
        pretrained.resolve(value)
    except (FileNotFoundError, ValueError) as e:
        raise defaults.ConfigError(f"config field {name}: {e}") from None


# ------------------------------------------------------------ tokenizers


def load_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint (HF dir, .gguf file or known name),
    without reading its weights."""
    from jaxreward.models import gguf_io, hf_io, pretrained
    path = pretrained.resolve(name_or_path)
    with pretrained.checkpoint_errors(path):
        if path.is_dir():
            return hf_io.load_tokenizer(path)
        if pretrained.is_gguf(path):
            return gguf_io.tokenizer_from_gguf(gguf_io.open_gguf(path), source=str(path))
    raise UserError(f"{path}: expected an HF checkpoint directory or a .gguf file")


def _export_meta_file(directory: str) -> tuple[str, dict]:
    """`(path, meta)` of the export's ensemble.json or reward_model.json."""
    path = os.path.join(directory, ensemble_lib.ENSEMBLE_FILE)
    if not os.path.exists(path):
        path = os.path.join(directory, "reward_model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: point scorer.reward_model_dir at the "
                                "`reward_model/` folder a reward_model run wrote into its workdir")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        if not isinstance(meta.get("pretrained", ""), str):
            raise ValueError(f"field 'pretrained' must be a string, got {meta['pretrained']!r}")
        return path, meta
    except ValueError as e:  # bad JSON or bad UTF-8 (both ValueErrors)
        raise CorruptFileError(f"{path} is damaged or not a reward-model export "
                               f"({type(e).__name__}: {e}); export the reward model again") from None


def scorer_tokenizer(config):
    """`scorer.tokenizer` if set, else the exported model's backbone's, the
    policy's, or None (text scorer)."""
    s = config.scorer
    if s.tokenizer:
        return load_tokenizer(s.tokenizer)
    if s.kind == "exported":
        meta_path, meta = _export_meta_file(s.reward_model_dir)
        source = meta.get("pretrained", "")
        if not source or source == "random":
            raise UserError(f"the reward model in {s.reward_model_dir} has a random backbone "
                            f"(pretrained={source!r}), so no tokenizer: set scorer.tokenizer")
        try:
            return load_tokenizer(source)
        except FileNotFoundError as e:  # the backbone moved, or a relative path from another cwd
            raise UserError(f"the backbone {source!r} named by {meta_path} (field `pretrained`), whose "
                            f"tokenizer scores this reward model, is not found ({e}); set "
                            "--config.scorer.tokenizer to that checkpoint's new place (HF folder, "
                            ".gguf file or model name)") from None
    if s.kind == "implicit":
        return load_tokenizer(s.policy)
    return None


# ------------------------------------------------------------------ data


def _open(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def file_kind(path: str) -> str:
    """"best_of" when most JSON-object lines have a list `rejected` (best-of
    rows), else "pairs". A majority, not the first line, decides, so one
    odd line does not turn the file's valid rows into skipped ones; the
    lines of the other kind are skipped and counted by the reader (and a
    mixed file is said in one line here).

    Raises:
      UserError: as many lines of one kind as of the other.
    """
    best = pairs = 0
    try:
        with _open(path) as f:
            for raw in f:
                try:
                    obj = json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(obj, dict):
                    if isinstance(obj.get("rejected"), list) and not isinstance(obj.get("chosen"), list):
                        best += 1
                    else:
                        pairs += 1
    except (OSError, EOFError, zlib.error):
        pass  # a damaged stream: the reader names the file and the line it broke at
    if best and best == pairs:  # no majority: either reading would skip half the file
        raise UserError(f"{path}: as many best-of lines (a `rejected` list) as pair lines ({best} "
                        "each), so it is neither kind; put them in two files")
    kind = "best_of" if best > pairs else "pairs"
    if best and pairs:
        print(f"{os.path.basename(path)}: {best} best-of lines (a `rejected` list) and {pairs} pair lines: "
              f"read as {'best-of rows' if kind == 'best_of' else 'pairs'}; the other lines are skipped")
    return kind


def read_best_of(path: str, *, on_error: str = "skip", render_chat=None) -> tuple[list[Row], ReadReport]:
    """Best-of rows `{"prompt", "chosen": str, "rejected": [str, ...], "subset"?}`.

    `prompt` is a string, or a list of `{"role", "content"}` messages rendered
    with `render_chat(messages, add_generation_prompt=True)`. Blank lines are
    ignored; a bad line is a `DataError` (file, line, field), raised with
    on_error="raise", else skipped and counted in the report.
    """
    report = ReadReport(path=pathlib.Path(path).name, fmt="best_of")
    rows = []
    with _open(path) as f:
        for lineno, raw in numbered_lines(f, pathlib.Path(path), on_error, report):
            if not raw.strip():
                report.blank += 1
                continue
            report.lines += 1
            try:
                rows.append(_best_of_row(raw, path, lineno, render_chat))
            except DataError as error:
                if on_error == "raise":
                    raise
                report.add_error(error, f"{report.path}:{lineno}")
                continue
            report.kept += 1
    return rows, report


def _best_of_row(raw: bytes, path: str, lineno: int, render_chat) -> Row:
    """One best-of line, checked as the pair reader checks its lines (valid
    UTF-8 JSON object, no lone surrogate or NUL in any text, chat roles from
    `preference.ROLES`), then for the best-of shape."""
    bad = lambda field, reason, detail="": DataError(path, lineno, field, reason, detail)
    obj = parse_record(raw.removeprefix(b"\xef\xbb\xbf"), path, lineno)
    for key in ("prompt", "chosen", "rejected"):
        if key not in obj:
            raise bad(key, "missing field")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        check_messages(prompt, "prompt", path, lineno)
        if render_chat is None:
            raise bad("prompt", "chat template error", "chat messages need a tokenizer with a chat "
                      "template: set scorer.tokenizer")
        prompt = render_chat(prompt, add_generation_prompt=True) if prompt else ""
    if not isinstance(prompt, str):
        raise bad("prompt", "wrong type", f"expected str or messages, got {type(prompt).__name__}")
    if not prompt.strip():
        raise bad("prompt", "empty prompt")
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not isinstance(chosen, str):
        raise bad("chosen", "wrong type", f"expected str, got {type(chosen).__name__}")
    if not isinstance(rejected, list) or not rejected or not all(isinstance(r, str) for r in rejected):
        raise bad("rejected", "wrong type", "expected a non-empty list of strings")
    for key, value in [("chosen", chosen)] + [(f"rejected[{j}]", r) for j, r in enumerate(rejected)]:
        if not value.strip():
            raise bad(key, "empty response")
    subset = obj.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise bad("subset", "wrong type", f"expected str, got {type(subset).__name__}")
    return Row(prompt, (chosen, *rejected), path, lineno, subset or None, best_of=True)


def _pair_rows(pairs, path: str) -> list[Row]:
    return [Row(p.prompt, (p.chosen, p.rejected), path, int(p.source.rpartition(":")[2]),
                p.subset or None, best_of=False) for p in pairs]


def read_rows(config, tokenizer) -> tuple[list[Row], list[dict]]:
    """All rows of `data.paths` (each file capped at `data.max_rows`), and one
    summary per file; prints each file's reader report."""
    d = config.data
    render_chat = tokenizer.apply_chat_template if tokenizer is not None and tokenizer.chat_template else None
    if d.hh_as_chat and render_chat is None:
        raise UserError("data.hh_as_chat=True renders HH transcripts with a chat template, and this "
                        "scorer has no tokenizer with one: set scorer.tokenizer or data.hh_as_chat=False")
    rows, files = [], []
    for i, path in enumerate(data_paths(config)):
        kind = file_kind(path)
        if kind == "best_of":
            if d.source == "tfds":
                raise UserError(f"{path}: data.source=tfds reads pair files only, and this file holds "
                                "best-of rows (a `rejected` list); use data.source=jsonl")
            got, report = read_best_of(path, on_error=d.on_error, render_chat=render_chat)
            summary = report.summary()
        else:
            kw = dict(fmt=d.format, on_error=d.on_error, render_chat=render_chat, hh_as_chat=d.hh_as_chat)
            try:
                if d.source == "tfds":
                    from jaxreward.data import tfds_builders  # local: tfds loads slowly
                    builder, build_report = tfds_builders.build(
                        "pairs", path, os.path.expanduser(d.tfds_data_dir), name=f"{d.tfds_name}_{i}", **kw)
                    pairs = tfds_builders.decode_all(builder.as_data_source("train"))
                    summary = build_report.summary()
                else:
                    pairs, report = read_preference_pairs(path, **kw)
                    summary = report.summary()
            except DataError:
                raise
            except ValueError as e:
                if render_chat is None and "render_chat" in str(e):
                    raise UserError(f"{path}: holds chat messages; set scorer.tokenizer to a tokenizer "
                                    "with a chat template") from None
                raise
            got = sorted(_pair_rows(pairs, path), key=lambda r: r.line)
        print(summary)
        if not got:
            raise UserError(f"{path}: no usable rows ({summary})")
        if d.max_rows:
            got = got[:d.max_rows]
        rows += got
        files.append({"path": path, "kind": kind, "rows": len(got), "read_report": summary})
    return rows, files


def row_subsets(rows: list[Row], sections_configured: bool) -> list[str]:
    """Each row's subset; a row without one is `DEFAULT_SUBSET`, or, when
    `report.sections` is configured, a `DataError` naming file, line, field."""
    out = []
    for r in rows:
        if r.subset is None:
            if sections_configured:
                raise DataError(r.file, r.line, "subset", "missing field",
                                "report.sections is set, so every line needs a subset")
            out.append(DEFAULT_SUBSET)
        else:
            out.append(r.subset)
    return out


def display_names(paths) -> dict[str, str]:
    """Each path's file name, or the path itself where two names collide."""
    names = [os.path.basename(p) for p in paths]
    return {p: (n if names.count(n) == 1 else p) for p, n in zip(paths, names)}


# --------------------------------------------------------------- scoring


def _shard_params(model, params, mesh, stacked: bool = False):
    """`params` placed on the mesh by the model's logical-axis shardings;
    `stacked`: an ensemble's params, whose leading member axis stays whole."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    shardings = parallel.param_shardings(mesh, boxed["params"])
    if stacked:
        shardings = jax.tree.map(lambda sh: NamedSharding(sh.mesh, P(None, *sh.spec)), shardings)
    return jax.device_put(params, shardings)


def tokenize_responses(rows: list[Row], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Token arrays `[X, T]` (tokens, attention_mask, loss_mask, positions) of
    every (prompt, response) of `rows`, in row order, chosen first.

    Each response is tokenized by `tokenize_pairs` as the chosen side of a
    pair whose other side is the row's longest response, so a row's
    responses share one prompt cut, and a pair's two sequences are exactly
    the ones the reward_model job trains and evaluates on.

    Raises:
      UserError: a response that does not fit (see `tokenize_pairs`).
    """
    lengths = _response_lengths(tokenizer, [x for r in rows for x in r.responses])
    pseudo, i = [], 0
    for r in rows:
        longest = r.responses[int(np.argmax(lengths[i:i + len(r.responses)]))]
        pseudo += [PreferencePair(r.prompt, x, longest, f"{r.file}:{r.line}") for x in r.responses]
        i += len(r.responses)
    arrays, report = tokenize_pairs(pseudo, tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length or None)
    if report.num_kept != len(pseudo):
        raise UserError(f"some responses cannot be scored: {report.summary()}")
    print(f"tokenized {len(pseudo)} responses of {len(rows)} rows (max_length {max_length}): prompt cut "
          f"in {report.prompt_truncated}, response cut in {report.chosen_truncated}")
    width = int(arrays["chosen_attention_mask"].sum(axis=1).max())  # right padding: drop empty columns
    return {k.removeprefix("chosen_"): v[:, :width] for k, v in arrays.items() if k.startswith("chosen_")}


def _response_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of responses encoded as `tokenize_pairs` encodes them
    (plain text); 0 for a text that cannot be encoded (`tokenize_pairs`
    drops and reports its pair)."""
    try:
        return [len(ids) for ids in tokenizer.encode_batch(texts, plain=True)]
    except ValueError:  # a text the tokenizer cannot encode: find it one by one
        out = []
        for text in texts:
            try:
                out.append(len(tokenizer.encode(text, plain=True)))
            except ValueError:
                out.append(0)
        return out


def make_scorer(config, tokenizer, mesh):
    """`(score, description)`: `score(rows) -> float32[X]`, one score per
    response of every row, in row order, chosen first."""
    s, d = config.scorer, config.data
    if s.kind == "text":
        fn = rewards.get(s.text_reward)

        def score_text(rows):
            return rewards.call(fn, [r.prompt for r in rows for _ in r.responses],
                                [x for r in rows for x in r.responses])
        return score_text, f"text reward {s.text_reward!r}"

    if s.kind == "exported":
        from jaxreward.models.heads import RewardModel
        from jaxreward.models.reward_io import load_reward_model
        members = ensemble_lib.is_ensemble_dir(s.reward_model_dir)
        if members:  # params with a leading member axis [E, ...]
            rm, params, meta = ensemble_lib.load_ensemble(s.reward_model_dir)
            aggregate, std_coef = ensemble_lib.config_options(config)
        else:
            rm, params, meta = load_reward_model(s.reward_model_dir)
        if s.objective >= rm.num_objectives:
            raise defaults.ConfigError(f"config field scorer.objective={s.objective}: the reward model "
                                       f"has {rm.num_objectives} objective(s)")
        vocab = [rm.config.vocab_size]
        rm = RewardModel(dataclasses.replace(rm.config, dtype=config.model.dtype),
                         num_objectives=rm.num_objectives, pooling=rm.pooling)
        params = _shard_params(rm, params, mesh, stacked=members)
        k = s.objective

        def one_score(p, b):
            return rm.apply({"params": p}, b["tokens"], b["attention_mask"], b["positions"],
                            b.get("loss_mask"))[:, k]
        if members:
            def score_fn(p, b):  # member rewards [E, X] -> one reward per sequence [X]
                r_EX = jax.vmap(one_score, in_axes=(0, None))(p, b)
                return ensemble_reward(r_EX.astype(jnp.float32), aggregate, std_coef=std_coef)
            how = ensemble_lib.aggregate_label(aggregate, std_coef)
            description = (f"reward-model ensemble {s.reward_model_dir} ({meta['members']} members, {how}; "
                           f"objective {k}, backbone {meta['pretrained']})")
        else:
            score_fn = one_score
            description = (f"exported reward model {s.reward_model_dir} (objective {k}, "
                           f"backbone {meta['pretrained']})")
    else:
        import jaxreward
        from jaxreward.models.scoring import sequence_logps, token_logps
        policy, policy_params, _ = jaxreward.load_pretrained(s.policy, dtype=config.model.dtype)
        ref, ref_params, _ = ((policy, policy_params, None) if s.reference == s.policy  # a sanity check: all 0
                              else jaxreward.load_pretrained(s.reference, dtype=config.model.dtype))
        vocab = [policy.config.vocab_size, ref.config.vocab_size]
        if vocab[0] != vocab[1]:
            raise UserError(f"scorer.policy and scorer.reference have different vocabularies "
                            f"({vocab[0]} vs {vocab[1]}); they must share a tokenizer")
        params = (_shard_params(policy, policy_params, mesh), _shard_params(ref, ref_params, mesh))
        beta, average = float(s.beta), bool(s.length_normalize)

        def logps(model, p, b):
            return sequence_logps(token_logps(model, p, b["tokens"], b["attention_mask"], b["positions"]),
                                  b["loss_mask"], average=average, attention_mask_BT=b["attention_mask"])

        def score_fn(p, b):
            return beta * (logps(policy, p[0], b) - logps(ref, p[1], b))
        description = (f"implicit reward {beta} * (log pi - log pi_ref), pi = {s.policy}, "
                       f"pi_ref = {s.reference}, {'mean' if average else 'sum'} over response tokens")
    if tokenizer.vocab_size > min(vocab):
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary ({min(vocab)}); set scorer.tokenizer to the model's own")
    jitted = jax.jit(lambda p, b: score_fn(p, b).astype(jnp.float32))

    def score_model(rows):
        arrays = tokenize_responses(rows, tokenizer, d.max_length, d.max_prompt_length)
        return evaluate.score_all_rows(jitted, params, arrays, d.batch_size, mesh)
    return score_model, description


# ---------------------------------------------------------------- report


def credits(rows: list[Row], scores_X: np.ndarray) -> tuple[np.ndarray, list[float], list]:
    """Per row: its credit (from the float32 scores), chosen score and
    rejected score(s) (a float for a pair, a list for a best-of row; floats
    for JSON, see `_f32`).

    Raises:
      UserError: a non-finite score, naming the row's file and line.
    """
    bad = np.flatnonzero(~np.isfinite(scores_X))
    offsets = np.cumsum([0] + [len(r.responses) for r in rows])
    if bad.size:
        r = int(np.searchsorted(offsets, bad[0], side="right")) - 1
        raise UserError(f"the scorer gave a non-finite score ({scores_X[bad[0]]}) to response "
                        f"{bad[0] - offsets[r]} of {rows[r].file}:{rows[r].line}")
    credit = np.zeros(len(rows))
    chosen = scores_X[offsets[:-1]]
    rejected = [scores_X[o + 1:o + len(r.responses)] for o, r in zip(offsets, rows)]
    pair = [i for i, r in enumerate(rows) if not r.best_of]
    credit[pair] = rewardbench.pair_credit(chosen[pair], np.asarray([rejected[i][0] for i in pair]))
    for size in {len(r.responses) for r in rows if r.best_of}:
        group = [i for i, r in enumerate(rows) if r.best_of and len(r.responses) == size]
        credit[group] = rewardbench.best_of_credit(chosen[group], np.stack([rejected[i] for i in group]))
    rejected = [[_f32(x) for x in rej] if r.best_of else _f32(rej[0]) for r, rej in zip(rows, rejected)]
    return credit, [_f32(x) for x in chosen], rejected


def _f32(x) -> float:
    """A float32 score as the shortest float that reads back to it (1.11, not 1.1100000143)."""
    return float(str(np.float32(x)))


def build_report(rows: list[Row], subsets_R: list[str], credit_R: np.ndarray, sections: dict) -> dict:
    """Subset, section and overall stats (see `jaxreward/train/rewardbench.py`).

    `sections` empty: one section per file (the pooled credit of its rows).
    """
    chance_R = rewardbench.chance([len(r.responses) - 1 for r in rows])
    subsets = rewardbench.subset_stats(subsets_R, credit_R, chance_R)
    for name in subsets:
        kinds = sorted({r.kind for r, s in zip(rows, subsets_R) if s == name})
        subsets[name]["kind"] = kinds[0] if len(kinds) == 1 else "mixed"
    if sections:
        section_stats = rewardbench.section_stats(subsets, sections)
    else:
        names = display_names(list(dict.fromkeys(r.file for r in rows)))
        section_stats = {}
        for path, name in names.items():
            idx = [i for i, r in enumerate(rows) if r.file == path]
            section_stats[name] = {**rewardbench.stat(credit_R[idx].sum(), len(idx)),
                                   "subsets": list(dict.fromkeys(subsets_R[i] for i in idx))}
    score = rewardbench.mean_of_sections(section_stats)
    # The rows the score covers: those of the sections' subsets (with
    # report.sections, subsets in no section are reported but not scored).
    scored = {name for s in section_stats.values() for name in s["subsets"]}
    score["num_rows"] = sum(1 for s in subsets_R if s in scored)
    return {"num_rows": len(rows), "subsets": subsets, "sections": section_stats,
            "sections_from": "config" if sections else "files", "score": score}


def print_report(report: dict) -> None:
    ci = lambda s: f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    print("\nper subset (pairs: chosen > rejected strictly; best-of: 1/#tied at the top)")
    print(metrics_lib.format_table(
        [{"subset": k, "kind": s["kind"], "rows": s["n"], "accuracy": s["accuracy"], "95% CI": ci(s),
          "chance": s["chance"]} for k, s in report["subsets"].items()]))
    print(f"\nper section (subsets weighted by rows; sections from {report['sections_from']})")
    print(metrics_lib.format_table(
        [{"section": k, "rows": s["n"], "accuracy": s["accuracy"], "95% CI": ci(s),
          "subsets": ", ".join(s["subsets"])} for k, s in report["sections"].items()]))
    score = report["score"]
    covered = score.get("num_rows", report["num_rows"])
    rows = (f"{covered} rows" if covered == report["num_rows"]
            else f"{covered} of the {report['num_rows']} rows; the others are in no section")
    print(f"\nscore (unweighted mean over {score['num_sections']} section(s)): {score['accuracy']:.4f} "
          f"95% CI {ci(score)} ({rows})")


def plot_subsets(report: dict, path: str) -> None:
    """Bar chart of subset accuracies with their Wilson intervals as error bars
    and each subset's chance level as a tick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["subsets"])
    stats = [report["subsets"][n] for n in names]
    acc = np.asarray([s["accuracy"] for s in stats])
    err = np.maximum(0.0, [[a - s["ci_low"] for a, s in zip(acc, stats)],   # matplotlib refuses
                           [s["ci_high"] - a for a, s in zip(acc, stats)]])  # any negative bar
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.8))
    x = np.arange(len(names))
    ax.bar(x, acc, yerr=err, capsize=3, color="tab:blue", ecolor="k", label="accuracy, 95% Wilson CI")
    ax.hlines([s["chance"] for s in stats], x - 0.45, x + 0.45, colors="tab:red", linestyles="--",
              zorder=3, label="chance (random scorer)")
    ax.set_xticks(x, names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy")
    score = report["score"]
    ax.set_title(f"score {score['accuracy']:.3f} [{score['ci_low']:.3f}, {score['ci_high']:.3f}] "
                 f"(mean over {score['num_sections']} section(s))", fontsize=10)
    ax.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    metrics_lib.save_figure(fig, path)


# ------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- Data (before any model loads: bad lines fail fast).
    os.makedirs(workdir, exist_ok=True)
    tokenizer = scorer_tokenizer(config)
    rows, files = read_rows(config, tokenizer)
    sections = {k: list(v) for k, v in config.report.sections.items()}
    subsets_R = row_subsets(rows, bool(sections))
    if sections:
        found = set(subsets_R)
        missing = sorted({s for v in sections.values() for s in v} - found)
        if missing:
            raise UserError(f"report.sections names subsets with no rows: {', '.join(missing)}; "
                            f"subsets found: {', '.join(sorted(found))}")
        loose = sorted(found - {s for v in sections.values() for s in v})
        if loose:
            print(f"warning: subsets in no section (reported, not in the score): {', '.join(loose)}")
    print(f"{len(rows)} rows from {len(files)} file(s), {len(set(subsets_R))} subset(s)")

    # --- Score every response.
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    score, description = make_scorer(config, tokenizer, mesh)
    print(f"scorer: {description}")
    scores_X = np.asarray(score(rows), np.float32)

    # --- Credits and the report.
    credit_R, chosen, rejected = credits(rows, scores_X)
    report = build_report(rows, subsets_R, credit_R, sections)
    report = {"scorer": {"kind": config.scorer.kind, "description": description}, "files": files, **report}
    print_report(report)

    # --- Write (one writer: every process holds the same report, gathered from the mesh).
    if jax.process_index() != 0:
        return report
    with open(os.path.join(workdir, "evaluation.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "scores.jsonl"), "w", encoding="utf-8") as f:
        for r, subset, c, rej, credit in zip(rows, subsets_R, chosen, rejected, credit_R):
            f.write(json.dumps({"file": r.file, "line": r.line, "subset": subset, "kind": r.kind,
                                "chosen": c, "rejected": rej, "correct": float(credit)}) + "\n")
    written = ["evaluation.json", "scores.jsonl"]
    if config.report.plot:
        try:
            plot_subsets(report, os.path.join(workdir, PLOT_FILE))
            written.append(PLOT_FILE)
        except ImportError as e:  # matplotlib is a test extra in setup.py
            print(f"warning: no {PLOT_FILE} ({e}); `pip install matplotlib` or set report.plot=False")
    print(f"wrote {', '.join(written)} to {workdir}")
    return report
