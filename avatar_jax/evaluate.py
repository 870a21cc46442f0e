"""Evaluate trained runs: `python -m avatar_jax.evaluate --workdir DIR [--split test,ood]
[--num_clips N] [--evals name,...] [--crosstalk] [--table timar|synthdyad|synthdyad_ablation|dualtalk|
avatar_forcing|echo] [--seeds 0,1,2] [--options history_turns=0] [--probe_clips N]`.

Loads the last checkpoint (EMA weights) and its config from `--workdir` and runs the metric
evaluators the config declares (`config.evals`, see evals/runner.py; sample videos are left to
`avatar_jax.sample`), e.g. the SynthDyad table of the model next to ground truth, mean motion and
shuffled audio, written to `<workdir>/eval/<split>.{json,md}` and printed.

With `--table`, prints a published layout instead (one row per workdir label; several workdirs
with one label, or several `--seeds`, give mean ± 95% CI) and writes it as .md + .json.
"""
from __future__ import annotations

import os

from absl import app, flags

from avatar_jax.evals import motion, runner, tables


def _define_flags():
  """CLI flags, defined only when run as a program."""
  global _WORKDIR, _NAMES, _SPLITS, _CLIPS, _EVALS, _TABLE, _SEEDS, _SAVED, _REFS, _OUT, _OPTIONS
  global _PREFIX, _CROSSTALK, _PROBE
  _WORKDIR = flags.DEFINE_list("workdir", None, "Training workdir(s) (checkpoints + config).")
  _NAMES = flags.DEFINE_list("names", None, "Row label per workdir (default: its basename); "
                             "workdirs with the same label are averaged (mean ± 95% CI).")
  _SPLITS = flags.DEFINE_list("split", None, "Splits to evaluate (default: each evaluator's).")
  _CLIPS = flags.DEFINE_integer("num_clips", None, "Eval windows per split (default: each "
                                "evaluator's num_clips).")
  _EVALS = flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all but "
                             "sample videos).")
  _TABLE = flags.DEFINE_enum("table", None, sorted(tables.LAYOUTS),
                             "Print this published table layout instead of the SynthDyad table "
                             "with baselines.")
  _SEEDS = flags.DEFINE_list("seeds", ["0"], "Sampling seeds (several: mean ± 95% CI).")
  _SAVED = flags.DEFINE_bool("saved", False, "With --table: use the metrics the runs saved at the "
                             "end of training instead of re-evaluating.")
  _PREFIX = flags.DEFINE_string("prefix", "", "With --saved: read eval/<prefix><split>.json (the "
                                "`prefix` of the run's synthdyad evaluator, e.g. n0_).")
  _REFS = flags.DEFINE_bool("references", False, "With --table: add the reference rows "
                            "(shuffled audio, mean motion, ground truth).")
  _OPTIONS = flags.DEFINE_list("options", None, "With --table: `system.generate` options as "
                               "name=value (numbers parsed), e.g. history_turns=0 for TIMAR.")
  _CROSSTALK = flags.DEFINE_bool("crosstalk", None, "Add (or, with --nocrosstalk, drop) the "
                                 "SynthDyad table's crosstalk row: the own voice with another "
                                 "conversation's partner talking over it (default: the run's "
                                 "config).")
  _PROBE = flags.DEFINE_integer("probe_clips", None, "Reconstruction evaluators: fit the latent "
                                "probe on this many train clips (0: off; default: the config's).")
  _OUT = flags.DEFINE_string("out", None, "Where to write <out>.md/.json (default: "
                             "<first workdir>/eval/table_<table>).")


def _evaluate(workdir: str) -> None:
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  system, model, config, step = trainer.restore_model(workdir)
  names = _EVALS.value or [n for n, c in runner.declared(config, system).items()
                           if c.type != "video"]
  if not names:
    raise app.UsageError(f"{workdir}: the config declares no metric evaluator (config.evals)")
  results = runner.run(system, model, config, workdir, step=step, only=names, force=True,
                       overrides={"split": ",".join(_SPLITS.value or []) or None,
                                  "num_clips": _CLIPS.value, "crosstalk": _CROSSTALK.value,
                                  "probe_clips": _PROBE.value})
  for per_split in results.values():
    for res in (per_split or {}).values():
      if isinstance(res, dict) and "text" in res:
        print(res["text"] + "\n")


def _parse_options(items):
  if not items:
    return None
  out = {}
  for item in items:
    name, eq, value = item.partition("=")
    if not eq:
      raise app.UsageError(f"--options {item!r}: expected name=value")
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        pass
    out[name] = value
  return out


def main(argv):
  del argv
  workdirs = _WORKDIR.value
  if _TABLE.value is None:
    if len(workdirs) != 1:
      raise app.UsageError("several --workdir values need --table")
    _evaluate(workdirs[0])
    return
  names = _NAMES.value or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs):
    raise app.UsageError(f"--names has {len(names)} labels for {len(workdirs)} workdirs")
  splits = _SPLITS.value or ["test"]
  if _SAVED.value:
    rows = motion.saved_rows(workdirs, names, splits, references=_REFS.value, prefix=_PREFIX.value)
  else:
    rows = motion.table_rows(workdirs, names, splits, [int(s) for s in _SEEDS.value], _CLIPS.value,
                             _TABLE.value, references=_REFS.value,
                             options=_parse_options(_OPTIONS.value))
  out = _OUT.value or os.path.join(workdirs[0], "eval", f"table_{_TABLE.value}")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tables.write_table(_TABLE.value, rows, out)
  print(tables.render_table(_TABLE.value, rows))


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
