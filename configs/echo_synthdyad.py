"""ECHO on SynthDyad latents (models/video/echo.py): two stages on the Beyond Monologue video DiT.

  python -m avatar_jax.train --config configs/echo_synthdyad.py:size=S,stage=1 \\
      --workdir runs/echo_s64_stage1
  python -m avatar_jax.train --config configs/echo_synthdyad.py:size=S,stage=2,init=runs/echo_s64_stage1 \\
      --workdir runs/echo_s64
  # ablations (stage 2 from the same stage 1): role-agnostic fusion, no long-range context
  python -m avatar_jax.train --config configs/echo_synthdyad.py:size=S,stage=2,sdcm=False \\
      --workdir runs/echo_s64_nosdcm
  python -m avatar_jax.train --config configs/echo_synthdyad.py:size=S,stage=2,context=False \\
      --workdir runs/echo_s64_nocontext
  python -m avatar_jax.evaluate --table echo --names full,no_sdcm,no_context \\
      --workdir runs/echo_s64,runs/echo_s64_nosdcm,runs/echo_s64_nocontext

after the VAE is trained and its latents encoded (as for configs/bm_synthdyad.py). Stage 1 is the
Beyond-Monologue-style base (role-agnostic fusion, no context); stage 2 adds SDCM and the
long-range user context, initialised from stage 1 (`init`) so that it starts exactly at stage 1's
outputs. Training reads spans of `span` video frames (default: the whole 8-s train clip) and
denoises `clip_frames` of them at a random place; the frames before are the context's history.
Evaluators: as Beyond Monologue's (a sample mp4; the SynthDyad table through the face reader).

Arguments (`--config configs/echo_synthdyad.py:size=tiny,stage=2,init=DIR`):
  size (tiny | S | B), stage (1 | 2), init (stage 2: the stage-1 workdir; "-" =
  runs/echo_s<res>_stage1), sdcm (stage 2: region-routed fusion; False = role-agnostic),
  context (stage 2: the long-range user context), res, attn, steps, batch, lr (stage 2 default:
  half the size's), seed, clip_frames (denoised window, video frames, a multiple of 4), span
  (video frames per training example, a multiple of clip_frames' 4; >= clip_frames), chunk_s
  (context chunk, seconds), dtype, remat, latents, vae, vae_size, eval_clips — as in
  configs/bm_synthdyad.py.
No SynthDyad numbers yet: the `echo` table needs GPU runs (docs/echo.md).
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models import vae
from avatar_jax.models.video import echo

SIZES = {
    "tiny": dict(steps=200, batch=4, lr=1e-3),
    "S": dict(steps=20_000, batch=32, lr=2e-4),
    "B": dict(steps=40_000, batch=32, lr=1e-4),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="S", stage=1, init="-", sdcm=True, context=True, res=64,
                             attn="gaussian_learned", steps=0, batch=0, lr=0.0, seed=0,
                             clip_frames=48, span=200, chunk_s=0.64, dtype="bfloat16",
                             remat=False, latents="", vae="-", vae_size="", eval_clips=16)
  if arg.size not in SIZES:
    raise ValueError(f"config argument size={arg.size!r}: expected one of {sorted(SIZES)}")
  if arg.stage not in (1, 2):
    raise ValueError(f"config argument stage={arg.stage}: expected 1 (base) or 2 (SDCM + context)")
  if arg.clip_frames % 4 or arg.span % 4 or arg.span < arg.clip_frames:
    raise ValueError(f"config arguments clip_frames={arg.clip_frames}, span={arg.span}: both "
                     "multiples of 4 (one latent row per 4 video frames), span >= clip_frames")
  size = SIZES[arg.size]
  steps = arg.steps or size["steps"]
  stage2 = arg.stage == 2
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.source = "arrays"
  c.data.arrays.dir = arg.latents or f"runs/vae_s{arg.res}_latents"
  c.data.synthdyad.resolution = arg.res
  c.data.clip_frames = arg.span
  c.data.cache = True   # clips held in memory once read (as configs/bm_synthdyad.py)
  c.data.batch_size = arg.batch or size["batch"]

  preset = "tiny" if arg.size == "tiny" else arg.size
  c.model = echo.default_config(preset, arg.attn, sdcm=stage2 and arg.sdcm,
                                context=stage2 and arg.context)
  c.model.window = arg.clip_frames // 4
  c.model.sample.window = arg.clip_frames // 4      # not the span: generation slides windows
  c.model.context.chunk_s = arg.chunk_s
  c.model.dit.dtype = arg.dtype
  c.model.dit.remat = arg.remat
  if arg.size == "tiny":
    c.model.adapters.num_queries = 2
    c.model.context.tokens = 4
  vae_dir = f"runs/vae_s{arg.res}" if arg.vae == "-" else arg.vae
  init = (f"runs/echo_s{arg.res}_stage1" if arg.init == "-" else arg.init) if stage2 else ""
  c.init_from = config_lib.ml_collections.ConfigDict(dict(
      main=config_lib.init_from(init),   # stage 2: every stage-1 weight; the new ones start at 0
      vae=config_lib.init_from(vae_dir, into="model/vae")))
  if vae_dir:
    c.model.vae = vae.default_config(arg.vae_size or ("tiny" if arg.size == "tiny" else "S"))
    c.model.vae.dtype = "float32"

  lr = arg.lr or size["lr"] * (0.5 if stage2 else 1.0)
  c.optim = dict(lr=lr, warmup_steps=min(1000, steps // 10), end_lr_factor=0.1,
                 b1=0.9, b2=0.99, weight_decay=0.01, clip_norm=1.0, ema_decay=0.999)
  c.train = dict(num_steps=steps, log_every=100 if arg.size != "tiny" else 10,
                 ckpt_every=max(steps // 5, 1), max_checkpoints=2, stats_batches=1,
                 progress_bar=arg.size != "tiny")
  c.evals = dict(
      sample=runner.evaluator("video", split="test", at_end=True),
      test=runner.evaluator("synthdyad", split="test,ood", num_clips=arg.eval_clips,
                            crosstalk=True, batch_size=4, at_end=True),
  ) if vae_dir else {}
  return config_lib.lock(c)
