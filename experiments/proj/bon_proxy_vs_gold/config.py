"""Study: best-of-N proxy vs gold reward, over several sampling seeds.

    python -m jaxreward.main --config=experiments/proj/bon_proxy_vs_gold/config.py \
        --workdir=runs/bon_proxy_vs_gold

The quickstart's config (configs/quickstart.py, `default` variant) plus the
study's own fields under `study`.
"""
import importlib.util
import os

import ml_collections

_QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "quickstart.py")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("quickstart_config", _QUICKSTART)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(variant)
    c.task = "proj.bon_proxy_vs_gold.driver"
    c.study = ml_collections.ConfigDict(dict(
        seeds=3,                    # best-of-N sampling seeds; the table reports mean ± std over them
    ))
    return c
