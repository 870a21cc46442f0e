"""SynthDyad quickstart: a tiny duplex motion DiT that talks and listens, trained on 2 CPU cores.

  python -m avatar_jax.train --config configs/quickstart.py --workdir runs/quickstart

Generates SynthDyad conversations on the fly (no download), trains a flow-matching motion
model on both audio streams with multi-head Gaussian time-distance attention, writes
checkpoints, TensorBoard logs, a sample mp4 (avatar | partner, both voices) and the SynthDyad
metrics table against two baselines (mean motion, shuffled audio). Rerunning resumes.
Should reach, on the test split: lip_corr >= 0.6, jaw_leak <= 0.05, in <= 10 minutes on 2 cores.

Arguments (`--config configs/quickstart.py:steps=300,width=64`):
  steps, width, depth, batch, attn (gaussian | global | frame), learn_sigma, eval_clips, seed,
  clip_frames, dtype (compute: float32 | bfloat16; float32 keeps CPU runs exact),
  w2v (a folder written by `python -m avatar_jax.convert wav2vec2`: a frozen wav2vec2 front end
  replaces the log-mels, see models/audio.py).
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models import audio
from avatar_jax.models.motion import motion_dit


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=800, width=64, depth=2, batch=16, attn="gaussian",
                             learn_sigma=True, eval_clips=32, seed=0, clip_frames=100,
                             dtype="float32", w2v="")
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.synthdyad.render = False          # the motion model needs audio + motion only
  c.data.synthdyad.cache = True
  c.data.split_sizes = dict(train=1024, test=128, ood=64)
  c.data.clip_frames = arg.clip_frames     # 4 s windows: enough for listening context
  c.data.batch_size = arg.batch
  c.data.features.n_mels = 40

  c.model = motion_dit.default_config()
  c.model.width, c.model.depth, c.model.heads = arg.width, arg.depth, 4
  c.model.dtype = arg.dtype                 # parameters stay float32 (param_dtype)
  c.model.attention.mode = arg.attn
  c.model.attention.learn_sigma = arg.learn_sigma
  c.model.sample.steps = 10

  c.init_from = config_lib.init_from()   # e.g. --config.init_from.workdir=runs/stage1
  c.optim = dict(lr=1e-3, warmup_steps=100, end_lr_factor=0.05, b1=0.9, b2=0.99,
                 weight_decay=1e-4, clip_norm=1.0, ema_decay=0.99)
  c.train = dict(num_steps=arg.steps, log_every=50, ckpt_every=200, max_checkpoints=2,
                 stats_batches=4, progress_bar=True)
  # Evaluators (evals/runner.py; they run in name order): a sample mp4 every 400 steps and at the
  # end (samples/step_*.mp4), then the SynthDyad table on whole test clips (eval/test.{md,json}).
  if arg.w2v:
    audio.use_wav2vec2(c, arg.w2v)
  c.evals = dict(
      sample=runner.evaluator("video", split="test", every=400, at_end=True),
      test=runner.evaluator("synthdyad", split="test", num_clips=arg.eval_clips, baselines=True,
                            crosstalk=True, batch_size=16, at_end=True),
  )
  return config_lib.lock(c)
