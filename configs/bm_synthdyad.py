"""Beyond Monologue's talking–listening video DiT on SynthDyad latents (models/video/beyond_monologue.py).

  python -m avatar_jax.train --config configs/bm_synthdyad.py:size=S,res=64 --workdir runs/bm_s64

after the VAE is trained and its latents pre-encoded:

  python -m avatar_jax.train --config configs/vae_synthdyad.py:size=S,res=64 --workdir runs/vae_s64
  python -m avatar_jax.encode --config configs/vae_synthdyad.py:res=64 --encoder runs/vae_s64 \\
      --out runs/vae_s64_latents

Training reads latents (latent_self, reference_latent) and log-mels from the encoded arrays;
the VAE (loaded frozen by init_from.vae) only turns generated latents into frames for the
evaluators and `python -m avatar_jax.sample`. Evaluators: a sample mp4, and the SynthDyad table
read from the generated video by the face reader (lip_corr, lip_offset, lip_conf, jaw_leak,
nod_f1, smile_resp, brow_resp, FD-face, FVD-face) against shuffled audio and the reader's
reading of the true video, on whole test and ood clips.

Arguments (`--config configs/bm_synthdyad.py:size=tiny,attn=frame`):
  size (tiny | S | B: models/dit.py presets), dit (the backbone's models/dit.py preset if not
  size's, e.g. wan2.1-1.3B to start from converted Wan 2.1-1.3B weights: docs/video_dit.md),
  res (64 | 128: picks the default VAE workdir and latents), attn (gaussian_learned |
  gaussian_fixed | frame | global: the audio cross-attention's time prior, Beyond Monologue's
  ablation), steps, batch, lr, seed, clip_frames (training window, video frames, a multiple
  of 4), dtype (compute), remat (recompute blocks in the backward pass), latents (the encode
  job's --out; default runs/vae_s<res>_latents), vae (the VAE workdir; default runs/vae_s<res>;
  "" = none: generation returns latents and only the flow loss is tracked), vae_size (its
  preset: S, tiny for size=tiny), eval_clips.
S's GPU training and the ablation have not run yet (docs/video_dit.md, Status); their results
and commands go to docs/tables.md.
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models import dit, vae
from avatar_jax.models.video import beyond_monologue as bm

SIZES = {
    "tiny": dict(steps=200, batch=4, lr=1e-3),
    "S": dict(steps=20_000, batch=32, lr=2e-4),
    "B": dict(steps=40_000, batch=32, lr=1e-4),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="S", dit="", res=64, attn="gaussian_learned", steps=0,
                             batch=0, lr=0.0, seed=0, clip_frames=48, dtype="bfloat16", remat=False,
                             latents="", vae="-", vae_size="", eval_clips=16)
  if arg.size not in SIZES:
    raise ValueError(f"config argument size={arg.size!r}: expected one of {sorted(SIZES)}")
  if arg.dit and arg.dit not in dit.PRESETS:
    raise ValueError(f"config argument dit={arg.dit!r}: expected one of {sorted(dit.PRESETS)}")
  if arg.clip_frames % 4:
    raise ValueError(f"config argument clip_frames={arg.clip_frames}: must be a multiple of 4 "
                     "(one latent frame per 4 video frames)")
  size = SIZES[arg.size]
  steps = arg.steps or size["steps"]
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  # FSDP and the token axis (context) come from the command line, e.g.
  # --config.mesh.fsdp=4 --config.mesh.context=2 (parameters and tokens carry logical axes).
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.source = "arrays"
  c.data.arrays.dir = arg.latents or f"runs/vae_s{arg.res}_latents"
  c.data.synthdyad.resolution = arg.res
  c.data.clip_frames = arg.clip_frames
  # Clips held in memory once read (the keys used: ~0.5 MB per 8-s clip at 64 px, ~0.5 GB for
  # 1,024 train clips): batches are then slices, ~110 batches/s on 2 CPU cores vs ~37 reading
  # records (docs/video_dit.md, "Input"). False for latent sets larger than host memory.
  c.data.cache = True
  c.data.batch_size = arg.batch or size["batch"]

  c.model = bm.default_config(arg.dit or arg.size, arg.attn)
  c.model.dit.dtype = arg.dtype
  c.model.dit.remat = arg.remat
  if arg.size == "tiny":
    c.model.adapters.num_queries = 2
  vae_dir = f"runs/vae_s{arg.res}" if arg.vae == "-" else arg.vae
  c.init_from = config_lib.ml_collections.ConfigDict(dict(
      # e.g. a converted Wan DiT (`python -m avatar_jax.convert wan_dit --no_text`) into model/dit
      main=config_lib.init_from(),
      vae=config_lib.init_from(vae_dir, into="model/vae")))
  if vae_dir:
    c.model.vae = vae.default_config(arg.vae_size or ("tiny" if arg.size == "tiny" else "S"))
    c.model.vae.dtype = "float32"

  c.optim = dict(lr=arg.lr or size["lr"], warmup_steps=min(1000, steps // 10), end_lr_factor=0.1,
                 b1=0.9, b2=0.99, weight_decay=0.01, clip_norm=1.0, ema_decay=0.999)
  c.train = dict(num_steps=steps, log_every=100 if arg.size != "tiny" else 10,
                 ckpt_every=max(steps // 5, 1), max_checkpoints=2, stats_batches=1,
                 progress_bar=arg.size != "tiny")
  c.evals = dict(
      sample=runner.evaluator("video", split="test", at_end=True),
      test=runner.evaluator("synthdyad", split="test,ood", num_clips=arg.eval_clips,
                            crosstalk=True, batch_size=4, at_end=True),
      # Minute-long clips, per 10-s segment: drift (FD-face) and window seams (evals/long_video.py);
      # `python -m avatar_jax.evaluate --workdir W --evals long`.
      long=runner.evaluator("long_video", split="test", num_clips=2, batch_size=1,
                            duration_s=60.0, segment_s=10.0, at_end=False),
  ) if vae_dir else {}
  return config_lib.lock(c)
