"""The Wan 2.1-architecture video VAE trained from scratch on SynthDyad renders.

  python -m avatar_jax.train --config configs/vae_synthdyad.py:size=S,res=64 --workdir runs/vae_s64

Arguments (`--config configs/vae_synthdyad.py:size=tiny,res=64,steps=100`):
  size (tiny | S | wan2.1), res (64 | 128: frames H = W), frames (clip length, 1 + 4k; 49 by
  default: a causal VAE trained on shorter windows fails deep into whole clips, docs/vae.md), steps,
  batch (clips per participant: each batch trains on 2·batch clips), lr, kl (KL weight),
  posterior (sample | mean: what the decoder sees in training), lip (extra loss weight of the
  mouth region's pixels: 1 + lip inside it; 0 = plain means), seed,
  dtype (compute: float32 | bfloat16), workers (data processes rendering the clips),
  temporal_init (random | inflate; default inflate for frames=1, else random: models/vae.py
  `WanVAE.inflate`), init (a workdir to start from, e.g. the image stage below).
Wan's own recipe, images first (each step is 2·batch still frames), then video from them:
  python -m avatar_jax.train --config configs/vae_synthdyad.py:size=S,res=64,frames=1,batch=32 --workdir runs/vae_s64_img
  python -m avatar_jax.train --config configs/vae_synthdyad.py:size=S,res=64,init=runs/vae_s64_img --workdir runs/vae_s64
Evaluators: a reconstruction table (PSNR, face-reader R² of jaw_open / smile / head_pitch read
from reconstructions, and a linear probe of the same coefficients from the latents,
evals/reconstruction.py) on whole test clips, and a sample mp4
(original | reconstruction). Pre-encode latents for the DiT afterwards with
`python -m avatar_jax.encode --config configs/vae_synthdyad.py:res=64 --encoder runs/vae_s64 --out DIR`.
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models import vae


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="S", res=64, frames=49, steps=4000, batch=4, lr=3e-4,
                             kl=1e-6, posterior="sample", lip=0.0, seed=0, dtype="float32", workers=0,
                             eval_clips=8, temporal_init="", init="")
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.synthdyad.render = True
  c.data.synthdyad.resolution = arg.res
  c.data.split_sizes = dict(train=4096, test=64, ood=32)
  c.data.clip_frames = arg.frames
  c.data.batch_size = arg.batch
  c.data.worker_count = arg.workers

  c.model = vae.default_config(arg.size)
  c.model.name = "vae"
  c.model.dtype = arg.dtype
  c.model.temporal_init = arg.temporal_init or ("inflate" if arg.frames == 1 else "random")
  # Wan's recipe adds a perceptual and a GAN term; here only pixels + KL (docs/vae.md).
  c.model.loss = dict(l1=1.0, l2=1.0, kl=arg.kl, posterior=arg.posterior, lip=float(arg.lip))

  # e.g. the image stage, or a converted published VAE (--config.init_from.workdir=DIR)
  c.init_from = config_lib.init_from(arg.init)
  c.optim = dict(lr=arg.lr, warmup_steps=min(200, arg.steps // 10), end_lr_factor=0.1, b1=0.9,
                 b2=0.99, weight_decay=0.0, clip_norm=1.0, ema_decay=0.999)
  c.train = dict(num_steps=arg.steps, log_every=100, ckpt_every=1000, max_checkpoints=2,
                 stats_batches=1, progress_bar=True)
  c.evals = dict(
      # probe_clips: the latent probe (do the latents carry jaw / smile / pitch linearly?) fitted
      # on 3× as many train clips as are scored.
      recon=runner.evaluator("reconstruction", split="test", num_clips=arg.eval_clips,
                             batch_size=2, at_end=True, probe_clips=3 * arg.eval_clips,
                             # the image stage is scored on what it learns: each frame a still
                             options=dict(stills=arg.frames == 1)),
      sample=runner.evaluator("video", split="test", at_end=True,
                              options=dict(stills=arg.frames == 1)),
  )
  return config_lib.lock(c)
