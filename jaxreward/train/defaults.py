"""Config blocks shared by every experiment config (configs/*.py).

Each function returns a fresh `ml_collections.ConfigDict`; every field has
its unit in a comment. Experiment files override what they need.
"""
import ml_collections


def pick_variant(variant: str | None, variants: tuple[str, ...], config_file: str) -> str:
    """The requested variant (the first one by default).

    Raises:
      ValueError: an unknown variant, naming the file and the known ones.
    """
    variant = variant or variants[0]
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of {config_file}; "
                         f"choose one of: {', '.join(variants)}")
    return variant


def mesh() -> ml_collections.ConfigDict:
    """Device mesh `(data, fsdp, tensor)`; -1 takes the remaining devices."""
    return ml_collections.ConfigDict(dict(
        data=-1,    # data-parallel replicas (devices)
        fsdp=1,     # parameter/optimizer sharding (devices); batch is split over it too
        tensor=1,   # tensor parallelism over heads / MLP / vocab (devices)
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
        num_steps=num_steps,       # total optimizer steps (defines the LR schedule)
        micro_batches=1,           # gradient-accumulation parts per step (divides batch size)
        log_every=log_every,       # steps between metric writes
        eval_every=0,              # steps between held-out evaluations (0: only at the end)
        checkpoint_every=50,       # steps between checkpoints (always one at the end)
        stop_after_steps=0,        # stop early at this step, as if preempted (0: run to num_steps)
        progress_bar=True,         # tqdm bar on stderr
    ))


def loss() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="bradley_terry",      # reward_loss registry name (jaxreward.objectives.registry)
    ))
