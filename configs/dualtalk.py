"""DualTalk (2505.18096): 56-d FLAME motion of one participant from both voices + partner motion.

  python -m avatar_jax.train --config configs/dualtalk.py:size=S --workdir runs/dualtalk

Trains the DualTalk regressor (avatar_jax/models/motion/dualtalk.py: own/partner audio encoders,
cross-modal temporal enhancer, interaction transformer, MSE + velocity loss) on SynthDyad
conversations generated on the fly, in the reference's 8-s windows (200 frames at 25 fps), then
writes a sample mp4 and the SynthDyad table with its FLAME 56-d metrics (test and ood splits,
against mean-motion, shuffled-audio and ground-truth references). Rerunning resumes.
`size=tiny` is CI-sized: `size=tiny,steps=600,clip_frames=100,eval_clips=8` trains in ~2 min on
2 CPU cores and reached on the test split lip_corr 0.95, lip_offset 0, jaw_leak 0.00 (mean
motion: jaw_leak 0.19), FLAME mse_jaw 8e-5 (mean motion 1.8e-3); its listening metrics (nod_f1,
smile_resp) stay near 0 at that size. size=S has not been run to convergence yet.

Arguments (`--config configs/dualtalk.py:size=tiny,steps=50`):
  size (tiny | S: the reference's widths), steps, batch, seed, clip_frames (training window in
  frames; 200 = DualTalk's 8 s), dtype (compute: float32 | bfloat16; parameters and loss stay
  float32), attn (gaussian | global: plain attention, as the reference | frame), eval_clips,
  real (train on the DualTalk dataset, below), data_dir (its TFDS data_dir), w2v (a folder
  written by `python -m avatar_jax.convert wav2vec2`: a frozen wav2vec2 front end replaces the
  log-mels, as the reference's wav2vec2-large; see models/audio.py).

On the real DualTalk data (https://huggingface.co/datasets/ZiqiaoPeng/DualTalk_Dataset): build
the TFDS dataset once from its train/ test/ ood/ folders of <name>_speaker{1,2}.{npz,wav}
(avatar_jax/data/builders/dualtalk; ArrayRecord, read later without TensorFlow), then train with
`real=True`, which sets config.data.source="tfds", config.data.tfds.name="dualtalk",
config.data.tfds.data_dir=<data_dir> and swaps the SynthDyad table (it needs SynthDyad truth)
for the "flame56" metrics (FD, P-FD, MSE, SID, rPCC, ...) on whole clips, one clip per batch
(clips differ in length); the TFDS source's rates are tfds.fps=25 and features.sample_rate=16000,
the defaults. Every training clip must be at least clip_frames long (the reference likewise drops
clips under 8 s).

  python -m avatar_jax.data.builders.build dualtalk --manual_dir /data/DualTalk_Dataset \\
      --data_dir /data/tfds
  python -m avatar_jax.train --workdir runs/dualtalk_real \\
      --config configs/dualtalk.py:size=S,real=true,data_dir=/data/tfds
"""
from avatar_jax import config_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.models import audio
from avatar_jax.models.motion import dualtalk

# width (feature_dim), audio encoder width, BiLSTM layers, interaction layers, decoder layers.
SIZES = {
    "tiny": dict(width=16, audio_width=16, audio_layers=1, lstm_layers=1, interaction_layers=1,
                 decoder_layers=1, mlp_ratio=2),
    "S": dict(width=256, audio_width=256, audio_layers=3, lstm_layers=2, interaction_layers=3,
              decoder_layers=1, mlp_ratio=4),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="S", steps=0, batch=0, seed=0, clip_frames=200,
                             dtype="float32", attn="gaussian", eval_clips=0, real=False,
                             data_dir="", w2v="")
  if arg.size not in SIZES:
    raise KeyError(f"config argument size={arg.size!r}: expected one of {sorted(SIZES)}")
  tiny = arg.size == "tiny"
  c = config_lib.ml_collections.ConfigDict()
  c.seed = arg.seed
  c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)

  c.data = pipeline.default_config()
  c.data.synthdyad.render = False          # a motion model: audio + motion only
  c.data.synthdyad.cache = True
  c.data.split_sizes = (dict(train=32, test=8, ood=8) if tiny else
                        dict(train=4096, test=128, ood=128))
  c.data.clip_frames = arg.clip_frames
  c.data.batch_size = arg.batch or (8 if tiny else 32)    # the reference trains at 32
  if tiny:
    c.data.features.n_mels = 16
  if arg.real:
    c.data.source = "tfds"
    c.data.tfds.name = "dualtalk"
    c.data.tfds.data_dir = arg.data_dir or None

  c.model = dualtalk.default_config()
  c.model.update(SIZES[arg.size])
  c.model.dtype = arg.dtype
  c.model.attention.mode = arg.attn

  c.init_from = config_lib.init_from()
  if arg.w2v:
    audio.use_wav2vec2(c, arg.w2v)
  # The reference: Adam at 1e-4, no weight decay or clipping (clipping at 1 here as a guard).
  c.optim = dict(lr=1e-3 if tiny else 1e-4, warmup_steps=0 if tiny else 500, end_lr_factor=0.1,
                 b1=0.9, b2=0.999, weight_decay=0.0, clip_norm=1.0,
                 ema_decay=0.9 if tiny else 0.999)
  steps = arg.steps or (100 if tiny else 50_000)
  c.train = dict(num_steps=steps, log_every=10 if tiny else 100,
                 ckpt_every=max(steps // 2, 1) if tiny else 5000, max_checkpoints=2,
                 stats_batches=1 if tiny else 8, progress_bar=not tiny)
  clips = arg.eval_clips or (2 if tiny else 64)
  # Evaluators (evals/runner.py, run in name order) on whole clips at the end: a sample mp4,
  # then the SynthDyad table with the FLAME 56-d metrics (via the inverse export map). Real
  # DualTalk data has no SynthDyad truth: the "flame56" metrics only, one clip per batch.
  c.evals = dict(
      sample=runner.evaluator("video", split="test", every=0, at_end=True),
      test=(runner.evaluator("flame56", split="test,ood", num_clips=clips, batch_size=1,
                             at_end=True) if arg.real else
            runner.evaluator("synthdyad", split="test,ood", flame56=True, baselines=True,
                             crosstalk=True, num_clips=clips, batch_size=8, at_end=True)))
  return config_lib.lock(c)
