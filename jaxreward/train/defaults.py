"""Config blocks shared by every experiment config (configs/*.py).

Each function returns a fresh `ml_collections.ConfigDict`; every field has
its unit in a comment. Experiment files override what they need.
"""
import math
import os

import ml_collections

from jaxreward.errors import UserError


def pick_variant(variant: str | None, variants: tuple[str, ...], config_file: str) -> str:
    """The requested variant (the first one by default).

    Raises:
      ConfigError: an unknown variant, naming the file and the known ones.
    """
    variant = variant or variants[0]
    if variant not in variants:
        raise ConfigError(f"unknown variant {variant!r} of {config_file}; "
                         f"choose one of: {', '.join(variants)}")
    return variant


def mesh() -> ml_collections.ConfigDict:
    """Device mesh `(data, fsdp, tensor)`; -1 takes the remaining devices."""
    return ml_collections.ConfigDict(dict(
        data=-1,    # data-parallel replicas (devices)
        fsdp=1,     # parameter/optimizer sharding (devices); batch is split over it too
        tensor=1,   # tensor parallelism over heads / MLP / vocab (devices)
    ))


def ensemble() -> ml_collections.ConfigDict:
    """How the members of a reward-model ensemble export (`ensemble.json`)
    combine wherever a job takes a reward-model directory; ignored for a
    single reward model."""
    return ml_collections.ConfigDict(dict(
        aggregate="mean",    # mean | min | mean_minus_std (objectives.reward.ensemble_reward)
        std_coef=1.0,        # λ of mean_minus_std: reward units subtracted per member std
    ))


def optimizer(learning_rate: float = 1e-4, warmup_steps: int = 10) -> ml_collections.ConfigDict:
    """AdamW with linear warmup and cosine decay."""
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate,  # peak learning rate (per step)
        warmup_steps=warmup_steps,    # optimizer steps of linear warmup from 0
        final_lr_ratio=0.1,           # final LR as a fraction of the peak (cosine end)
        b1=0.9,                       # Adam β1
        b2=0.95,                      # Adam β2
        eps=1e-8,                     # Adam ε
        weight_decay=0.0,             # decoupled weight decay (per step, × LR), matrices only
        max_grad_norm=1.0,            # global-norm clip (0 disables)
    ))


def train(num_steps: int = 100, log_every: int = 10) -> ml_collections.ConfigDict:
    """Loop lengths and intervals (all in optimizer steps)."""
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps,       # total optimizer steps
        schedule_steps=0,          # LR schedule length in steps (0 = num_steps; set on extension)
        micro_batches=1,           # gradient-accumulation parts per step (divides batch size)
        log_every=log_every,       # steps between metric writes
        eval_every=0,              # steps between held-out evaluations (0: only at the end)
        checkpoint_every=50,       # steps between checkpoints (always one at the end)
        stop_after_steps=0,        # stop early at this step, as if preempted (0: run to num_steps)
        progress_bar=True,         # tqdm bar on stderr
    ))


def loss() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bradley_terry",      # pairwise_reward_loss registry name (jaxreward.objectives.registry)
    ))


# ---------------------------------------------------------------------------
# Checks. Each raises ConfigError with one line naming the config field; main
# runs `check_common` on every config, then the driver's own `check_config`,
# all before any model loads.

class ConfigError(UserError):
    """An impossible config value; the message names the field (a `UserError`,
    hence a `ValueError`)."""


_MISSING = object()


def get_field(config, name: str):
    """The value at dotted `name`, or `_MISSING` if the config has no such field."""
    node = config
    for part in name.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_int(config, name: str, low: int = 0, high: int | None = None) -> None:
    """`name`, if present, is an integer in [low, high]."""
    v = get_field(config, name)
    if v is _MISSING:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"config field {name} must be an integer {rng}, got {v!r}")


def check_best_of_n_max_n(config, name: str = "eval.best_of_n_max_n", off: bool = True) -> None:
    """`name`, if present, is a power of two (or 0, off, where `off`): the
    best-of-N curves double N from 1, so another maximum would be silently
    cut down."""
    check_int(config, name, 0 if off else 1)
    v = get_field(config, name)
    if v is not _MISSING and v & (v - 1):
        raise ConfigError(f"config field {name}={v}: best-of-N runs N = 1, 2, 4, …; use "
                          f"{'0 (off) or ' if off else ''}a power of two (e.g. {1 << (v.bit_length() - 1)})")


def check_at_least_one_batch(config, rows: str, batch: str) -> None:
    """The count `rows` (e.g. `synthetic.num_train_pairs`) is at least the
    batch size `batch`, so the loader can make one batch."""
    n, b = get_field(config, rows), get_field(config, batch)
    if isinstance(n, int) and isinstance(b, int) and n < b:
        raise ConfigError(f"config field {rows}={n} is fewer than one batch ({batch}={b})")


def check_enough_prompts(config, batch: str = "rollout.prompts_per_step", num_train: int | None = None, *,
                         per_prompt: str | None = None, cap: str | None = None) -> None:
    """The train prompts of `rollout.prompt_set` fill one `batch` (with
    `per_prompt`, that many rows per prompt; with `cap`, at most that many
    prompts are used, e.g. `data.num_prompts` in the VAS job).

    Without `num_train` it runs before any model loads: data.source synthetic
    or arithmetic makes `data.num_prompts` prompts; a prompt file (jsonl,
    pairs) makes at most its non-blank lines less the eval prompts held out
    (`data.num_eval_prompts`, at most half). Once the file is read the drivers
    call it with `num_train`, the train prompts that survived (bad lines
    skipped, pair prompts made distinct).

    Raises:
      ConfigError: naming `batch`, the prompt count and where it comes from.
    """
    d, need = config.data, get_field(config, batch)
    if not isinstance(need, int) or isinstance(need, bool) or need < 1:
        return  # check_int names it
    from_file = d.get("source") in ("jsonl", "pairs")
    if num_train is not None:
        have = num_train
        what = (f"{have} usable train prompts of data.prompts_path={d.prompts_path!r}" if from_file
                else f"{have} train prompts")
    elif from_file:
        path, held = d.prompts_path, d.num_eval_prompts
        if not isinstance(path, str) or not os.path.isfile(path) or not isinstance(held, int):
            return  # check_path / check_int name it
        lines = _count_lines(path, stop_at=need + held)  # enough lines: enough prompts (rows >= prompts)
        if lines is None:
            return  # a corrupt file: the reader names the line it broke at
        have = lines - min(held, lines // 2)
        what = (f"at most {have} train prompts: data.prompts_path={path!r} has {lines} non-blank "
                f"line(s) (usable prompts are counted after the model loads), {min(held, lines // 2)} "
                f"held out for eval (data.num_eval_prompts={held})")
    else:
        have = d.num_prompts
        if not isinstance(have, int):
            return  # check_int names it
        what = f"data.num_prompts={have} train prompts"
    capped = get_field(config, cap) if cap else _MISSING
    if isinstance(capped, int) and capped < have:
        have, what = capped, f"{cap}={capped} train prompts"
    k = get_field(config, per_prompt) if per_prompt else 1
    if not isinstance(k, int) or have * k >= need:
        return
    if per_prompt:
        what = f"{have * k} train samples ({what}, × {per_prompt}={k})"
    raise ConfigError(f"config field {batch}={need} is more than the {what}; lower {batch} to at most "
                      f"{have * k} or give more prompts")


def per_process_batch(config, name: str = "data.batch_size") -> int:
    """This process's rows of the global batch `name`: its value divided by
    `jax.process_count()` (each process loads its own rows; the global batch
    is their concatenation). The drivers whose `data.batch_size` is split
    among processes call it from their `check_config`, before any model loads.

    Raises:
      ConfigError: the batch does not divide by the process count (a floor
        division would train on a smaller batch than the config says, silently),
        or over the mesh's data×fsdp batch shards (the step would fail after
        the long passes), naming the field, the count and the nearest sizes
        that divide; or, on several processes, a mesh.tensor that spreads a
        batch shard over devices of two processes (each process feeds only
        its own rows).
    """
    import jax  # local: config checks import no jax until they need it
    check_int(config, name, 1)
    b, p = get_field(config, name), jax.process_count()
    if b % p:
        near = [s for s in (b // p * p, (b // p + 1) * p) if s > 0]
        raise ConfigError(f"config field {name}={b} does not divide among the {p} processes of this run "
                          f"(jax.process_count()); use {' or '.join(map(str, near))}")
    shards = batch_shards(config)
    if shards and b % shards:
        near = [s for s in (b // shards * shards, (b // shards + 1) * shards) if s > 0]
        raise ConfigError(f"config field {name}={b} does not split over the mesh's data×fsdp = {shards} "
                          f"batch shards (mesh.data={config.mesh.data}, mesh.fsdp={config.mesh.fsdp}, "
                          f"{jax.device_count()} devices); use {' or '.join(map(str, near))}"
                          + _mesh_for_batch(b, config.mesh.fsdp, jax.device_count()))
    if shards and p > 1 and jax.local_device_count() % (jax.device_count() // shards):
        tensor, local = jax.device_count() // shards, jax.local_device_count()
        raise ConfigError(f"config field mesh.tensor: the mesh puts each of its data×fsdp = {shards} batch "
                          f"shards on {tensor} devices, more than (or not a divisor of) the {local} devices of "
                          f"each of the {p} processes; every process feeds its own rows, so a batch shard must "
                          f"lie within one process: use a mesh.tensor that divides {local}, e.g. "
                          f"--config.mesh.tensor={math.gcd(tensor, local)} with a larger mesh.data")
    return b // p


def _mesh_for_batch(batch: int, fsdp: int, devices: int) -> str:
    """", or --config.mesh.data=d --config.mesh.tensor=t": the largest data axis
    that, with `fsdp` (1 if it is -1), splits `batch` and leaves whole devices
    to the tensor axis (a fixed mesh must use every device); "" if none."""
    f = fsdp if fsdp > 0 else 1
    fits = [d for d in range(1, devices + 1) if devices % (d * f) == 0 and batch % (d * f) == 0]
    if not fits or devices % f:
        return ""
    d = max(fits)
    return (f", or keep the batch with --config.mesh.data={d} --config.mesh.fsdp={f} "
            f"--config.mesh.tensor={devices // (d * f)}")


def batch_shards(config) -> int | None:
    """data×fsdp of the config's mesh on this run's devices (a -1 axis takes
    the devices the others leave), or None when the config has no mesh or
    the mesh does not fit the devices (`check_mesh` says why)."""
    if get_field(config, "mesh") is _MISSING:
        return None
    import jax  # local: config checks import no jax until they need it
    shape = [config.mesh[k] for k in ("data", "fsdp", "tensor")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1) for v in shape) \
            or shape.count(-1) > 1:
        return None
    n, known = jax.device_count(), math.prod(v for v in shape if v != -1)
    if -1 in shape:
        if n % known:
            return None
        shape[shape.index(-1)] = n // known
    elif known != n:
        return None
    return shape[0] * shape[1]


def _count_lines(path: str, stop_at: int | None = None) -> int | None:
    """Non-blank lines of a file (`.gz` read decompressed), counting no
    further than `stop_at`; None for a corrupt file."""
    import gzip  # local: only when a file is checked
    import zlib
    n = 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            for line in f:
                n += bool(line.strip())
                if stop_at is not None and n >= stop_at:
                    break
    except (OSError, EOFError, zlib.error):
        return None
    return n


def check_float(config, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """`name`, if present, is a finite number in the given (half-)open range."""
    v = get_field(config, name)
    if v is _MISSING:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}"
        raise ConfigError(f"config field {name} must be a finite number{where}, got {v!r}")


def check_choice(config, name: str, choices) -> None:
    """`name`, if present, is one of `choices`."""
    v = get_field(config, name)
    if v is not _MISSING and v not in choices:
        shown = ", ".join(repr(c) if c == "" else str(c) for c in choices)  # '' (off) stays visible
        raise ConfigError(f"config field {name} must be one of {shown}; "
                          f"got {v!r}")


def check_path(config, name: str, required: bool = False) -> None:
    """`name`, if present and non-empty, is an existing file or folder."""
    v = get_field(config, name)
    if v is _MISSING:
        return
    if not v:
        if required:
            raise ConfigError(f"config field {name} is empty: set --config.{name}=PATH")
        return
    if not isinstance(v, str) or not os.path.exists(v):
        raise ConfigError(f"config field {name}: {v!r} does not exist")


def check_file_fields_unused(config, source_field: str = "data.source", generated: str = "synthetic") -> None:
    """Refuses file settings that a generated data source would ignore:
    with `data.source=synthetic`, a `data.train_path`, `data.eval_path` or a
    `data.format` other than "auto" is never read, and a run on the
    generated pairs would look like a run on the user's file.

    Raises:
      ConfigError: naming the fields given and `data.source`.
    """
    if get_field(config, source_field) != generated:
        return
    given = [f"data.{k}={get_field(config, f'data.{k}')!r}" for k in ("train_path", "eval_path")
             if get_field(config, f"data.{k}") not in (_MISSING, "", None)]
    if get_field(config, "data.format") not in (_MISSING, "auto", None):
        given.append(f"data.format={get_field(config, 'data.format')!r}")
    if given:
        raise ConfigError(f"config field {source_field}={generated!r} generates its data, so {', '.join(given)} "
                          f"would be ignored: set --config.{source_field}=jsonl to read the file")


def check_mesh(config) -> None:
    """`mesh.data/fsdp/tensor` fit the devices of this run (one may be -1)."""
    if get_field(config, "mesh") is _MISSING:
        return
    import jax  # local: config checks import no jax until a mesh is checked
    n = jax.device_count()
    shape = {k: config.mesh[k] for k in ("data", "fsdp", "tensor")}
    for k, v in shape.items():
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
            raise ConfigError(f"config field mesh.{k} must be an integer >= 1 or -1, got {v!r}")
    if list(shape.values()).count(-1) > 1:
        raise ConfigError(f"config fields mesh.*: at most one of data/fsdp/tensor may be -1, got {shape}")
    known = math.prod(v for v in shape.values() if v != -1)
    fits = n % known == 0 if -1 in shape.values() else known == n
    if not fits:
        raise ConfigError(f"config field mesh: data×fsdp×tensor = {shape} does not fit the "
                          f"{n} device(s) of this run")


def check_not_empty(config, name: str) -> None:
    """`name`, if it names an existing file (`.gz` read decompressed), holds
    at least one non-blank line: an empty data file is refused here, before
    any model loads, whatever `data.on_error` says."""
    v = get_field(config, name)
    if v is not _MISSING and isinstance(v, str) and v and os.path.isdir(v):
        raise ConfigError(f"config field {name}: {v!r} is a folder, not a data file (give the file in it)")
    if v is _MISSING or not v or not isinstance(v, str) or not os.path.isfile(v):
        return
    import gzip  # local: only when a file is checked
    try:
        with (gzip.open if v.endswith(".gz") else open)(v, "rb") as f:
            if any(line.strip() for line in f):
                return
    except (OSError, EOFError):
        return  # a corrupt file: the reader reports it with the line it broke at
    raise ConfigError(f"config field {name}: {v!r} is empty (no records)")


def check_distinct_files(config, train: str, held_out: str) -> None:
    """`held_out`, if set, is not the very file `train` names: an eval on the
    training records would report training accuracy as held-out."""
    a, b = get_field(config, train), get_field(config, held_out)
    if _MISSING in (a, b) or not a or not b or not isinstance(a, str) or not isinstance(b, str):
        return
    try:
        same = os.path.samefile(a, b)
    except OSError:
        return  # a missing path: check_path names it
    if same:
        raise ConfigError(f"config field {held_out}={b!r} is the file {train} trains on, so its "
                          f"accuracy would not be held out; leave {held_out} empty to hold out "
                          f"records of {train}, or give another file")


def check_pretrained(config, name: str = "model.pretrained") -> None:
    """`name`, if present and non-empty, is an existing checkpoint path or a
    known model name whose package is installed (`models.pretrained.resolve`)."""
    v = get_field(config, name)
    if v is _MISSING or v == "":
        return
    from jaxreward.models import pretrained  # local: imports the model code
    try:
        path = pretrained.resolve(v)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(f"config field {name}: {e}") from None
    if not (path.is_dir() or pretrained.is_gguf(path)):  # e.g. a data file given by mistake
        raise ConfigError(f"config field {name}: {os.fspath(v)!r} is neither an HF checkpoint directory "
                          "nor a .gguf file")


ARCH_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")


def check_arch(config, name: str = "model.arch") -> None:
    """`name` (a random decoder's `LlamaConfig` fields, used when
    `model.pretrained` is empty), if present, builds a working decoder:
    sizes are integers >= 1, `vocab_size` >= 2 (token 0 pads; the synthetic
    tasks draw ids from 1 .. V − 1), `num_heads` a multiple of `num_kv_heads`,
    the head size (`head_dim`, default hidden_size // num_heads) even and >= 2
    (RoPE rotates pairs of dimensions), `rope_theta` > 0. Every driver that
    builds a random decoder calls it before any model is built.

    Raises:
      ConfigError: naming the first impossible field.
    """
    arch = get_field(config, name)
    if arch is _MISSING:
        return
    for size in ARCH_SIZES:
        check_int(config, f"{name}.{size}", 1)
    check_int(config, f"{name}.vocab_size", 2)
    check_float(config, f"{name}.rope_theta", 0.0, low_open=True)
    get = lambda key: arch[key] if key in arch else None
    heads, kv = get("num_heads"), get("num_kv_heads")
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(f"config field {name}.num_kv_heads={kv}: {name}.num_heads={heads} must be a "
                          "multiple of it (grouped-query attention shares each kv head among "
                          "num_heads / num_kv_heads query heads)")
    head_dim, hidden = get("head_dim"), get("hidden_size")
    if head_dim:
        check_int(config, f"{name}.head_dim", 0)
        if head_dim % 2:
            raise ConfigError(f"config field {name}.head_dim={head_dim} must be even (RoPE rotates pairs "
                              "of dimensions)")
    elif heads is not None and hidden is not None:
        dim = hidden // heads
        if dim < 2 or dim % 2:
            raise ConfigError(f"config field {name}.hidden_size={hidden}: the head size hidden_size // "
                              f"num_heads = {dim} (num_heads={heads}) must be even and >= 2 (RoPE rotates "
                              f"pairs of dimensions); e.g. hidden_size={max(2, dim + dim % 2) * heads}")


DTYPES = ("float32", "bfloat16", "float16")


def check_common(config, skip: tuple[str, ...] = ()) -> None:
    """Checks the shared blocks (optimizer, train, mesh, data, sampling,
    model.dtype, model.pretrained) wherever a config has them; a data or
    prompts file must not be empty. Fields in `skip` are left to the
    driver's own, narrower check (its `STRICT_FIELDS`), so a user never
    reads one range here and another there (best-of-N needs temperature > 0
    where the shared range allows greedy 0).

    Raises:
      ConfigError: naming the first field with an impossible value.
    """
    check_float(config, "optimizer.learning_rate", low=0.0, low_open=True)
    check_int(config, "optimizer.warmup_steps", 0)
    check_float(config, "optimizer.final_lr_ratio", 0.0, 1.0)
    check_float(config, "optimizer.b1", 0.0, 1.0, high_open=True)
    check_float(config, "optimizer.b2", 0.0, 1.0, high_open=True)
    check_float(config, "optimizer.eps", 0.0, low_open=True)
    check_float(config, "optimizer.weight_decay", 0.0)
    check_float(config, "optimizer.max_grad_norm", 0.0)
    for name in ("train.num_steps", "train.log_every", "train.checkpoint_every",
                 "train.micro_batches", "data.batch_size", "data.eval_batch_size"):
        check_int(config, name, 1)
    for name in ("train.eval_every", "train.stop_after_steps", "train.schedule_steps", "data.num_eval_pairs",
                 "data.max_train_pairs", "data.max_eval_pairs", "data.max_prompt_length",
                 "sampling.max_new_tokens", "sampling.top_k"):
        if name not in skip:
            check_int(config, name, 0)
    check_int(config, "data.max_length", 2)
    prompt_cap, length = get_field(config, "data.max_prompt_length"), get_field(config, "data.max_length")
    if prompt_cap not in (_MISSING, 0) and length is not _MISSING and prompt_cap >= length:
        raise ConfigError(f"config field data.max_prompt_length={prompt_cap} leaves no room for a "
                          f"response in data.max_length={length}")
    check_int(config, "seed", 0)
    if "sampling.temperature" not in skip:
        check_float(config, "sampling.temperature", 0.0)
    check_float(config, "sampling.top_p", 0.0, 1.0, low_open=True)
    check_choice(config, "model.dtype", DTYPES)
    check_choice(config, "data.on_error", ("skip", "raise"))
    if "data.format" not in skip:  # the DPO driver also reads unpaired feedback (KTO)
        check_choice(config, "data.format", ("auto", "hh", "trl", "trl_chat", "trl_implicit"))
    if get_field(config, "data.source") in (_MISSING, "jsonl"):
        for name in ("data.train_path", "data.eval_path"):
            check_not_empty(config, name)
    check_distinct_files(config, "data.train_path", "data.eval_path")
    check_not_empty(config, "prompts_path")
    check_pretrained(config)
    check_mesh(config)
    micro = get_field(config, "train.micro_batches")
    batch = get_field(config, "data.batch_size")
    if micro is not _MISSING and batch is not _MISSING and batch % micro:
        raise ConfigError(f"config field data.batch_size={batch} does not split into "
                          f"train.micro_batches={micro}")
