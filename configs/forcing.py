"""Avatar Forcing (2601.00664) in motion space: a block-causal, diffusion-forcing motion model
that streams (models/motion/forcing.py).

  python -m avatar_jax.train --config configs/forcing.py --workdir runs/forcing
  python -m avatar_jax.stream --workdir runs/forcing --self-audio a.wav --partner-audio b.wav

Trains on SynthDyad conversations generated on the fly, every block of `block` frames at its own
noise level; the evaluators generate block by block with KV caches (exactly what the stream
computes) and score the SynthDyad table against mean-motion and shuffled-audio baselines.

Arguments (`--config configs/forcing.py:size=tiny,steps=300`):
  size (tiny: 2 CPU cores | S), steps, batch, block (frames per streamed block), lookahead
  (frames of future audio a frame may see), history (seconds of past attention sees),
  user_motion (condition on the partner's motion, one block late), nfe (sampler steps per
  block), eval_clips, seed, clip_frames, dtype, dpo (a stage-1 workdir: train the DPO stage from
  it, diffusion/dpo.py; losers are the policy's samples without the user's conditions), beta.

  python -m avatar_jax.train --config configs/forcing.py:dpo=runs/forcing,steps=300 --workdir runs/forcing_dpo
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models.motion import forcing

SIZES = {
    "tiny": dict(width=64, depth=2, heads=4, steps=1500, batch=16, lr=1e-3, ema=0.99,
                 train_clips=1024),
    "S": dict(width=256, depth=6, heads=4, steps=20_000, batch=32, lr=3e-4, ema=0.999,
              train_clips=4096),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", steps=0, batch=0, block=10, lookahead=2,
                             history=4.0, user_motion=False, nfe=8, eval_clips=32, seed=0,
                             clip_frames=100, dtype="float32", dpo="", beta=500.0)
  if arg.size not in SIZES:
    raise ValueError(f"config argument size={arg.size!r}: expected one of {sorted(SIZES)}")
  size = SIZES[arg.size]
  steps = arg.steps or size["steps"]
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.synthdyad.render = False
  c.data.synthdyad.cache = True
  c.data.split_sizes = dict(train=size["train_clips"], test=128, ood=64)
  c.data.clip_frames = arg.clip_frames
  c.data.batch_size = arg.batch or size["batch"]
  c.data.features.n_mels = 40

  c.model = forcing.default_config()
  c.model.width, c.model.depth, c.model.heads = size["width"], size["depth"], size["heads"]
  c.model.block, c.model.lookahead, c.model.history = arg.block, arg.lookahead, arg.history
  c.model.use_partner_motion = arg.user_motion
  c.model.dtype = arg.dtype
  c.model.sample.steps = arg.nfe

  c.init_from = config_lib.init_from()
  if arg.dpo:
    # Stage 2: start from stage 1 and keep a frozen copy of it as the DPO reference.
    c.model.dpo.enabled, c.model.dpo.beta = True, arg.beta
    c.init_from = config_lib.ml_collections.ConfigDict(dict(
        main=config_lib.init_from(arg.dpo), ref=config_lib.init_from(arg.dpo, into="aux/ref")))
  c.optim = dict(lr=size["lr"] * (0.1 if arg.dpo else 1.0), warmup_steps=min(200, steps // 10), end_lr_factor=0.05, b1=0.9,
                 b2=0.99, weight_decay=1e-4, clip_norm=1.0, ema_decay=size["ema"])
  c.train = dict(num_steps=steps, log_every=50, ckpt_every=max(steps // 4, 1), max_checkpoints=2,
                 stats_batches=4, progress_bar=True)
  c.evals = dict(
      sample=runner.evaluator("video", split="test", at_end=True),
      # flame56: also the 56-d metrics (rPCC, SID, Var) of the avatar_forcing table layout.
      test=runner.evaluator("synthdyad", split="test", num_clips=arg.eval_clips, baselines=True,
                            flame56=True, batch_size=16, at_end=True),
  )
  return config_lib.lock(c)
