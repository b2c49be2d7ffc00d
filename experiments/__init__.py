"""Experiment drivers: `experiments/<job>.py` runs `config.task = "<job>"`.

Each driver has `run(config, workdir)` with its loop visible top to bottom,
and may define `check_config(config)` (called before any model loads).
Drivers import parts from `jaxreward/`, never another driver.
"""
