"""jaxreward: reward modeling and alignment in JAX/Flax.

Public entry points are re-exported here lazily, so `import jaxreward` stays
cheap and imports no jax until one is used.
"""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in ("load_pretrained", "save_pretrained"):
        from jaxreward.models import pretrained
        return getattr(pretrained, name)
    raise AttributeError(f"module 'jaxreward' has no attribute {name!r}")
