"""Train any system: `python -m avatar_jax.train --config configs/x.py[:args] --workdir DIR`.

Overrides: `--config.train.num_steps=100`; unknown keys are errors. Rerunning the same command
resumes from the last checkpoint in `--workdir`; resuming with another config is refused unless
the differing keys are named, e.g. `--allow_config_change=train.num_steps`.
"""
from __future__ import annotations

import logging as logging_lib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config keys (or prefixes, e.g. train.num_steps,optim) that may "
    "differ from the config of the checkpoints being resumed; others are refused.")
flags.mark_flags_as_required(["config", "workdir"])


class QuietLibraries(logging_lib.Filter):
  """Drops INFO chatter of checkpoint/data libraries (their warnings and errors still show)."""

  NOISY = ("/orbax/", "/grain/", "/etils/", "/tensorstore/")

  def filter(self, record):
    return record.levelno >= logging_lib.WARNING or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from avatar_jax import distributed, trainer  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(QuietLibraries())
  distributed.initialize()
  logging.info("Config:\n%s", _CONFIG.value)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             allow_config_change=_ALLOW_CHANGE.value)


def parse_flags(argv):
  """absl flag parsing that names the override when a `--config.x.y=v` key does not exist."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    sys.exit(f"error: unknown config key {e} in one of {overrides}. Configs are locked: every "
             "key must exist in the config file (run with --helpfull to list the overrides).")


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
