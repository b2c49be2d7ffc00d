"""Evaluate a reward model on preference files, without training (experiments/evaluate_rm.py).

    python -m jaxreward.main --config=configs/evaluate_rm.py:exported --workdir=runs/eval_rm \
        --config.scorer.reward_model_dir=runs/rm_hh/reward_model \
        --config.data.paths=my_pairs.jsonl --config.data.paths=my_best_of_4.jsonl

Variants:
  exported (default): a reward model exported by configs/reward_model.py
    (`<workdir>/reward_model/`); set `scorer.reward_model_dir`.
  implicit: the DPO implicit reward β·(log π − log π_ref) of a trained policy
    (`scorer.policy`) against its reference (`scorer.reference`).
  text: a Python text reward from jaxreward/rewards by name (no model;
    seconds), e.g. the `length` baseline.

Sections: `--config.report.sections='{"Chat": ["alpacaeval-easy", "mt-bench-easy"], "Safety": ["refusals-dangerous"]}'`
(section -> subsets; {} = one section per file). Files and formats: see
the driver's docstring.
"""
import ml_collections

from jaxreward.train import defaults

VARIANTS = ("exported", "implicit", "text")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/evaluate_rm.py")
    c = ml_collections.ConfigDict()
    c.task = "evaluate_rm"
    c.scorer = ml_collections.ConfigDict(dict(
        kind="exported",                       # exported | implicit | text
        reward_model_dir="",                   # exported: a reward_model/ (or reward_ensemble/) folder a run wrote
        objective=0,                           # exported: head output ranked (index in [0, K))
        policy="",                             # implicit: trained policy (HF dir, .gguf, or known name)
        reference="smollm2-135m-instruct",     # implicit: reference policy (HF dir, .gguf, or known name)
        beta=0.1,                              # implicit: β (reward units per nat of log-ratio)
        length_normalize=False,                # implicit: mean log-ratio per response token (else sum, nats)
        text_reward="length",                  # text: jaxreward.rewards registry name
        tokenizer="",                          # chat template + tokens ("" = the RM's backbone's / the policy's / none)
    ))
    c.ensemble = defaults.ensemble()          # scorer.reward_model_dir an ensemble export: how members combine
    c.model = ml_collections.ConfigDict(dict(
        dtype="float32",                       # compute dtype of the scorer (bfloat16 on accelerators)
    ))
    c.data = ml_collections.ConfigDict(dict(
        paths=("../shared/data/hh-rlhf/harmless-base-test.jsonl.gz",),  # .jsonl[.gz] files (repeat the flag)
        source="jsonl",                        # jsonl | tfds (pair files only)
        tfds_data_dir="~/tensorflow_datasets", # TFDS data dir (source=tfds)
        tfds_name="eval",                      # datasets jaxreward_pairs/<name>_<i>, i = index in paths (source=tfds)
        format="auto",                         # pair files: auto | hh | trl | trl_chat | trl_implicit
        on_error="skip",                       # skip | raise, for malformed lines (skips are reported)
        hh_as_chat=True,                       # render HH transcripts with the chat template (as in training)
        max_length=512,                        # tokens per scored sequence (prompt + response + EOS)
        max_prompt_length=0,                   # tokens of prompt kept (0: adaptive, >= half)
        max_rows=0,                            # usable rows kept per file, the first in file order (0 = all); the whole file is still read and checked
        batch_size=16,                         # sequences per forward
    ))
    c.report = ml_collections.ConfigDict(dict(
        sections=ml_collections.ConfigDict(),  # section -> list of subsets ({} = one section per file)
        plot=True,                             # write subset_accuracy.png (needs matplotlib)
    ))
    c.mesh = defaults.mesh()

    if variant == "implicit":
        c.scorer.kind = "implicit"
    elif variant == "text":
        c.scorer.kind = "text"
        c.data.hh_as_chat = False              # no tokenizer, so HH transcripts stay raw text
    return c
