"""Evaluate a trained run: `python -m avatar_jax.evaluate --workdir DIR [--split test,ood]`.

Loads the last checkpoint (EMA weights) and its config from `--workdir`, generates motion for
SynthDyad clips of each split, and scores it with the SynthDyad §6 metrics next to three
references: ground truth (what the metrics give the generator's own motion), mean motion
(a constant: the training mean), and the same model fed shuffled audio (each clip gets another
clip's two audio streams). Writes `<workdir>/eval/<split>.json` and `.md` and prints the table.
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
from avatar_jax.evals import synthdyad_metrics


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
                batch_size: int = 16) -> tuple[dict, list]:
  """{row name: aggregated metrics} for the model and (optionally) the reference rows."""
  samples = eval_samples(config, split, num_clips)
  rows, preds = {}, {}
  preds["model"] = generate_motion(system, model, mel_batch(samples, config), rng, batch_size)
  if baselines:
    if num_clips < 2:
      raise ValueError(f"the shuffled-audio baseline needs >= 2 clips, eval.num_clips={num_clips}")
    preds["shuffled audio"] = generate_motion(system, model, mel_batch(samples, config, shuffle=True),
                                              rng, batch_size)
    mean = np.asarray(model.mean.value)
    preds["mean motion"] = np.broadcast_to(mean, preds["model"].shape)
    preds["ground truth"] = np.stack([s["motion_self"] for s in samples])
  for name, pred in preds.items():
    rows[name] = synthdyad_metrics.aggregate(
        [synthdyad_metrics.clip_metrics(p, s) for p, s in zip(pred, samples)])
  return rows, samples


def write_results(rows: dict, workdir: str, split: str, step: int | None = None) -> str:
  """Writes eval/<split>.json and .md; returns the markdown table."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  table = synthdyad_metrics.format_table(rows)
  title = f"SynthDyad `{split}` split" + (f", step {step}" if step is not None else "")
  with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
    json.dump({"split": split, "step": step, "rows": rows}, f, indent=1)
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
    table = write_results(rows, workdir, split, step)
    logging.info("\n%s", table)
    if writer is not None and step is not None:
      writer.write_scalars(step, {f"eval_{split}/{k}": v for k, v in rows["model"].items()
                                  if k in dict(synthdyad_metrics.METRICS)})
      writer.write_texts(step, {f"eval_{split}": table})
  return results


# ------------------------------------------------------------------------------------------ CLI


def _define_flags():
  """CLI flags, defined only when run as a program (the module is also a library)."""
  global _WORKDIR, _SPLITS, _CLIPS
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints + config).")
  _SPLITS = flags.DEFINE_list("split", None, "Splits to evaluate (default: the config's eval.splits).")
  _CLIPS = flags.DEFINE_integer("num_clips", None, "Clips per split (default: config.eval.num_clips).")


def main(argv):
  del argv
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  system, model, config, step = trainer.restore_model(_WORKDIR.value)
  with config.unlocked():
    if _SPLITS.value:
      config.eval.splits = tuple(_SPLITS.value)
    if _CLIPS.value:
      config.eval.num_clips = _CLIPS.value
  evaluate_motion_system(system, model, config, _WORKDIR.value, step=step)
  for split in config.eval.splits:
    with open(os.path.join(_WORKDIR.value, "eval", f"{split}.md")) as f:
      print(f.read())


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
