"""Face reader: the SynthDyad evaluation CNN that reads motion coefficients from rendered frames.

  python -m avatar_jax.train --config configs/face_reader.py --workdir runs/face_reader

Renders SynthDyad conversations on the fly (train identities), trains on random short windows of
frames with each identity's reference image, and at the end measures R^2 per channel on unseen
test identities and exports `face_reader_export/` (params.npz, config.json, accuracy.json) — the
format `avatar_jax.models.face_reader.load_face_reader(path)` reads. Should reach R^2 >= 0.98 for
jaw_open, smile and head_pitch (one H200, `workers=14`: ~100 steps/s after
the first pass over the clips; on CPU use a tiny run to smoke-test).

Arguments (`--config configs/face_reader.py:steps=200,batch=16`):
  steps, batch, frames (per window), train_clips, eval_clips, lr, ema, workers, seed, res.
"""
from avatar_jax import config_lib
from avatar_jax.evals import runner
from avatar_jax.data import pipeline
from avatar_jax.models import face_reader


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=20000, batch=64, frames=8, train_clips=1024, eval_clips=32,
                             lr=1e-3, ema=0.995, workers=0, seed=0, res=64)
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.synthdyad.render = True
  c.data.synthdyad.resolution = arg.res
  c.data.synthdyad.cache = True             # each clip is rendered once, windows drawn from it
  c.data.split_sizes = dict(train=arg.train_clips, test=arg.eval_clips, ood=arg.eval_clips)
  c.data.clip_frames = arg.frames           # few frames per clip, many clips per batch
  c.data.batch_size = arg.batch
  c.data.mel_streams = ()                   # frames only
  c.data.keep_keys = ("video", "reference_image")
  c.data.worker_count = arg.workers

  c.model = face_reader.default_config()
  c.model.resolution = arg.res
  c.model.eval.clips = arg.eval_clips

  c.init_from = config_lib.init_from()   # e.g. --config.init_from.workdir=runs/stage1
  c.optim = dict(lr=arg.lr, warmup_steps=200, end_lr_factor=0.01, b1=0.9, b2=0.999,
                 weight_decay=1e-4, clip_norm=1.0, ema_decay=arg.ema)
  c.train = dict(num_steps=arg.steps, log_every=100, ckpt_every=1000,
                 max_checkpoints=1, stats_batches=4, progress_bar=True)
  # R² per channel on unseen clips and the export, at the end (evals/runner.py).
  c.evals = dict(accuracy=runner.evaluator("face_reader", at_end=True))
  return config_lib.lock(c)
