"""Evaluate trained runs: `python -m avatar_jax.evaluate --workdir DIR [--split test,ood]
[--table timar|synthdyad|synthdyad_ablation|dualtalk|avatar_forcing|echo] [--seeds 0,1,2]`.

Loads the last checkpoint (EMA weights) and its config from `--workdir`, generates motion for
SynthDyad clips of each split, and scores it with the SynthDyad §6 metrics next to three
references: ground truth (what the metrics give the generator's own motion), mean motion
(a constant: the training mean), and the same model fed shuffled audio (each clip gets another
clip's two audio streams). Writes `<workdir>/eval/<split>.json` and `.md` and prints the table.

With `--table`, prints a published layout instead (one row per workdir label; several workdirs
with one label, or several `--seeds`, give mean ± 95% CI) and writes it as .md + .json.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from avatar_jax.data import features, pipeline
from avatar_jax.data.synthdyad import flame
from avatar_jax.evals import dualtalk, synthdyad_metrics, tables


def eval_samples(config, split: str, num_clips: int) -> list[dict]:
  """The first `num_clips` samples of `split` from the run's data source (with the truth)."""
  source = pipeline.make_source(config.data, split)
  if num_clips > len(source):
    raise ValueError(f"eval.num_clips={num_clips} but split {split!r} has {len(source)} clips")
  return [source[i] for i in range(num_clips)]


def mel_batch(samples, config, *, shuffle: bool = False) -> dict[str, np.ndarray]:
  """Stacked log-mels of both streams: {'mel_self', 'mel_partner'}: [N, Ta, M].

  shuffle: clip i gets the audio of clip i+1 (a baseline that keeps audio statistics but breaks
  the link between audio and the clip's true motion).
  """
  mel_cfg = features.mel_config_from(config.data.features)
  order = np.roll(np.arange(len(samples)), -1) if shuffle else np.arange(len(samples))
  out = {}
  for stream in ("self", "partner"):
    out[f"mel_{stream}"] = np.stack([features.log_mel(samples[j][f"audio_{stream}"], mel_cfg)
                                     for j in order]).astype(np.float32)
  return out


def generate_motion(system, model, batch, rng, batch_size: int) -> np.ndarray:
  """Runs `system.generate` in chunks of `batch_size` clips: [N, T, C] float32."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def gen(state, b, rng):
    return system.generate(nnx.merge(graphdef, state), b, rng)["motion"]

  n = next(iter(batch.values())).shape[0]
  outs = []
  for i in range(0, n, batch_size):
    chunk = {k: jnp.asarray(v[i:i + batch_size]) for k, v in batch.items()}
    outs.append(np.asarray(gen(state, chunk, jax.random.fold_in(rng, i))))
  return np.concatenate(outs)


def motion_eval(system, model, config, split: str, *, num_clips: int, rng, baselines: bool = True,
                batch_size: int = 16, with_flame56: bool = False) -> tuple[dict, list]:
  """{row name: aggregated metrics} for the model and (optionally) the reference rows.

  with_flame56: also the DualTalk/TIMAR metrics (FD, P-FD, MSE, SID, rPCC, ...) on the 56-d
  export of the generated and true motion.
  """
  samples = eval_samples(config, split, num_clips)
  rows, preds = {}, {}
  preds["model"] = generate_motion(system, model, mel_batch(samples, config), rng, batch_size)
  if baselines:
    if num_clips < 2:
      raise ValueError(f"the shuffled-audio baseline needs >= 2 clips, eval.num_clips={num_clips}")
    preds["shuffled audio"] = generate_motion(system, model, mel_batch(samples, config, shuffle=True),
                                              rng, batch_size)
    mean = np.asarray(model.mean[...])
    preds["mean motion"] = np.broadcast_to(mean, preds["model"].shape)
    preds["ground truth"] = np.stack([s["motion_self"] for s in samples])
  for name, pred in preds.items():
    rows[name] = synthdyad_metrics.aggregate(
        [synthdyad_metrics.clip_metrics(p, s) for p, s in zip(pred, samples)])
    if with_flame56:
      # DualTalk/TIMAR metrics on the 56-d export of the same motion (SYNTHDYAD.md §3).
      agg, _ = dualtalk.evaluate_arrays([flame.to_flame56(p) for p in pred],
                                        [s["flame56_self"] for s in samples],
                                        [s["flame56_partner"] for s in samples])
      rows[name].update({k: v for k, v in agg.items() if k != "clips"})
  return rows, samples


def write_results(rows: dict, workdir: str, split: str, step: int | None = None,
                  seed: int | None = None) -> str:
  """Writes eval/<split>.json and .md; returns the markdown table."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  table = synthdyad_metrics.format_table(rows)
  title = f"SynthDyad `{split}` split" + (f", step {step}" if step is not None else "")
  with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
    json.dump({"split": split, "step": step, "seed": seed, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, f"{split}.md"), "w") as f:
    f.write(f"### {title}\n\n{table}\n")
  return f"### {title}\n\n{table}"


def evaluate_motion_system(system, model, config, workdir: str, *, writer=None, step=None) -> dict:
  """End-of-training / CLI evaluation shared by every motion-space system."""
  results = {}
  for split in config.eval.splits:
    rows, _ = motion_eval(system, model, config, split, num_clips=config.eval.num_clips,
                          rng=jax.random.key(config.seed + 1), baselines=config.eval.baselines,
                          batch_size=config.eval.batch_size)
    results[split] = rows
    table = write_results(rows, workdir, split, step, seed=config.seed)
    logging.info("\n%s", table)
    if writer is not None and step is not None:
      writer.write_scalars(step, {f"eval_{split}/{k}": v for k, v in rows["model"].items()
                                  if k in dict(synthdyad_metrics.METRICS)})
      writer.write_texts(step, {f"eval_{split}": table})
  return results


# ------------------------------------------------------------------------------------------ CLI
def table_rows(workdirs, names, splits, seeds, num_clips, table: str, *,
               references: bool = False) -> list[dict]:
  """One result row per (run, split, sampling seed): the model's metrics, labelled for `tables`.

  references: also rows for the references (shuffled audio, mean motion, ground truth).
  """
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  rows = []
  for workdir, name in zip(workdirs, names):
    system, model, config, step = trainer.restore_model(workdir)
    for split in splits:
      for seed in seeds:
        res, _ = motion_eval(system, model, config, split, num_clips=num_clips or config.eval.num_clips,
                             rng=jax.random.key(seed), baselines=references,
                             batch_size=config.eval.batch_size, with_flame56=table != "synthdyad")
        for kind, metrics in res.items():
          label = name if kind == "model" else kind
          label = f"{label} ({split})" if len(splits) > 1 else label
          rows.append({"name": label, "seed": seed, "split": split, "step": step,
                       "workdir": workdir, **metrics})
  return rows


def saved_rows(workdirs, names, splits, *, references: bool = False) -> list[dict]:
  """Rows from the metrics each run saved at the end of training (eval/<split>.json).

  references: also the reference rows saved with each run (shuffled audio, mean motion, ground
  truth), labelled by kind, so that several seeds give them mean ± CI too.
  """
  rows = []
  for workdir, name in zip(workdirs, names):
    for split in splits:
      path = os.path.join(workdir, "eval", f"{split}.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run saved no `{split}` evaluation; "
                                "evaluate without --saved")
      with open(path) as f:
        saved = json.load(f)
      label = f"{name} ({split})" if len(splits) > 1 else name
      rows.append({"name": label, "seed": saved.get("seed"), "split": split, "step": saved["step"],
                   "workdir": workdir, **saved["rows"]["model"]})
      if references:
        for ref, metrics in saved["rows"].items():
          if ref != "model":
            rows.append({"name": ref if len(splits) == 1 else f"{ref} ({split})",
                         "seed": saved.get("seed"), "split": split, "workdir": workdir, **metrics})
  return rows


def _define_flags():
  """CLI flags, defined only when run as a program (the module is also a library)."""
  global _WORKDIR, _NAMES, _SPLITS, _CLIPS, _TABLE, _SEEDS, _SAVED, _REFS, _OUT
  _WORKDIR = flags.DEFINE_list("workdir", None, "Training workdir(s) (checkpoints + config).")
  _NAMES = flags.DEFINE_list("names", None, "Row label per workdir (default: its basename); "
                             "workdirs with the same label are averaged (mean ± 95% CI).")
  _SPLITS = flags.DEFINE_list("split", None, "Splits to evaluate (default: the config's eval.splits).")
  _CLIPS = flags.DEFINE_integer("num_clips", None, "Clips per split (default: config.eval.num_clips).")
  _TABLE = flags.DEFINE_enum("table", None, sorted(tables.LAYOUTS),
                             "Print this published table layout instead of the SynthDyad table "
                             "with baselines.")
  _SEEDS = flags.DEFINE_list("seeds", ["0"], "Sampling seeds (several: mean ± 95% CI).")
  _SAVED = flags.DEFINE_bool("saved", False, "With --table: use the metrics the runs saved at the "
                             "end of training instead of re-evaluating.")
  _REFS = flags.DEFINE_bool("references", False, "With --table: add the reference rows "
                            "(shuffled audio, mean motion, ground truth).")
  _OUT = flags.DEFINE_string("out", None, "Where to write <out>.md/.json (default: "
                             "<first workdir>/eval/table_<table>).")


def main(argv):
  del argv
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  workdirs = _WORKDIR.value
  if _TABLE.value is None:
    if len(workdirs) != 1:
      raise app.UsageError("several --workdir values need --table")
    system, model, config, step = trainer.restore_model(workdirs[0])
    with config.unlocked():
      if _SPLITS.value:
        config.eval.splits = tuple(_SPLITS.value)
      if _CLIPS.value:
        config.eval.num_clips = _CLIPS.value
    evaluate_motion_system(system, model, config, workdirs[0], step=step)
    for split in config.eval.splits:
      with open(os.path.join(workdirs[0], "eval", f"{split}.md")) as f:
        print(f.read())
    return
  names = _NAMES.value or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(names) != len(workdirs):
    raise app.UsageError(f"--names has {len(names)} labels for {len(workdirs)} workdirs")
  splits = _SPLITS.value or ["test"]
  if _SAVED.value:
    rows = saved_rows(workdirs, names, splits, references=_REFS.value)
  else:
    rows = table_rows(workdirs, names, splits, [int(s) for s in _SEEDS.value], _CLIPS.value,
                      _TABLE.value, references=_REFS.value)
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
