"""Study: RL against a proxy reward model, gold vs proxy reward over √KL.

    python -m jaxreward.main --config=experiments/proj/rl_overoptimization/config.py \
        --workdir=runs/rl_overoptimization

Each entry of `study.runs` is one ordinary run of a driver (its config file,
variant and overrides), in `<workdir>/<name>`; the study driver runs the
missing ones one after another (a run finished with the same arguments is
reused, an interrupted one resumes, a changed one runs again in its workdir)
and draws them on one plot. The proxy reward model is the same
in every run (same task, seed and proxy settings).
"""
import ml_collections

# Shared by every run: a weak proxy (few noisy pairs) and long enough runs to over-optimize it.
COMMON = (("synthetic.proxy_pairs", 128), ("train.num_steps", 150), ("train.eval_every", 15),
          ("train.progress_bar", False))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    del variant
    c = ml_collections.ConfigDict()
    c.task = "proj.rl_overoptimization.driver"
    c.seed = 0                       # passed to every run (--config.seed), unless its overrides set seed
    c.study = ml_collections.ConfigDict(dict(
        # (name, config file, variant, ((field, value), ...)): one run each, in <workdir>/<name>
        runs=(
            ("grpo_beta0", "configs/rl.py", "synthetic", COMMON + (("kl.beta", 0.0),)),
            ("grpo_beta0.05", "configs/rl.py", "synthetic", COMMON + (("kl.beta", 0.05),)),
            ("grpo_beta0.2", "configs/rl.py", "synthetic", COMMON + (("kl.beta", 0.2),)),
            ("rloo_beta0.05", "configs/rl.py", "rloo", COMMON + (("kl.beta", 0.05),)),
            ("ppo_beta0.05", "configs/ppo.py", "synthetic", COMMON + (("kl.beta", 0.05),)),
        ),
        plot=True,                 # rl_overoptimization.png: gold and proxy reward against √KL, all runs
    ))
    return c
