"""Data layer: log-mel features, the Grain pipeline, TFDS builders."""
import math

import numpy as np
import pytest

from avatar_jax.data import features


# ===================================================================================== features
def _reference_log_mel(x: np.ndarray, cfg: features.MelConfig) -> np.ndarray:
  """float64, frame by frame, explicit DFT matrix; independent filterbank (transformers)."""
  from transformers.audio_utils import mel_filter_bank

  fb = mel_filter_bank(
      num_frequency_bins=cfg.n_fft // 2 + 1,
      num_mel_filters=cfg.n_mels,
      min_frequency=cfg.fmin,
      max_frequency=cfg.sample_rate / 2 if cfg.fmax is None else cfg.fmax,
      sampling_rate=cfg.sample_rate,
      norm="slaney",
      mel_scale="slaney",
  )
  x = np.asarray(x, np.float64)
  n = len(x) // cfg.hop_length
  # Periodic Hann of win_length, written out from its formula.
  m = np.arange(cfg.win_length)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * m / cfg.win_length)
  k = np.arange(cfg.n_fft // 2 + 1)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(cfg.win_length), k) / cfg.n_fft)
  out = np.zeros((n, cfg.n_mels))
  for f in range(n):
    # Window centred on the middle of hop interval f (sample f*hop + hop//2).
    first = f * cfg.hop_length + cfg.hop_length // 2 - cfg.win_length // 2
    seg = np.zeros(cfg.win_length)
    for i in range(cfg.win_length):
      j = first + i
      if 0 <= j < len(x):
        seg[i] = x[j]
    # Zero-padding a win_length frame to n_fft around its centre only adds a linear phase, so the
    # power spectrum equals that of the window placed at the start of the FFT frame.
    power = np.abs((seg * hann) @ dft) ** 2
    out[f] = np.log(power @ fb + cfg.log_floor)
  return out


@pytest.mark.parametrize(
    "num_samples, cfg",
    [
        (16000 + 777, features.MelConfig()),
        (5 * 441 + 3, features.MelConfig(sample_rate=22050, n_mels=40, hop_length=441,
                                         win_length=882, n_fft=1024, fmin=30.0, fmax=9000.0)),
        (319, features.MelConfig()),  # shorter than one hop: zero frames
    ],
)
def test_log_mel_matches_float64_dft(num_samples, cfg):
  rng = np.random.default_rng(num_samples)
  x = (rng.standard_normal(num_samples) * rng.uniform(0.01, 1.0)).astype(np.float32)
  got = features.log_mel(x, cfg)
  assert got.dtype == np.float32
  assert got.shape == (num_samples // cfg.hop_length, cfg.n_mels)
  want = _reference_log_mel(x, cfg)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


def test_log_mel_batched_equals_per_row():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4001)).astype(np.float32)
  got = features.log_mel(x)
  assert got.shape == (2, 3, 12, 80)
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(got[i, j], features.log_mel(x[i, j]), atol=1e-5)


def test_mel_filterbank_slaney_scale_and_norm():
  # Slaney scale: 1 kHz is mel 15; linear (200/3 Hz per mel) below, log step ln(6.4)/27 above.
  np.testing.assert_allclose(features.hz_to_mel([0.0, 500.0, 1000.0]), [0.0, 7.5, 15.0])
  np.testing.assert_allclose(features.hz_to_mel(6400.0), 15 + 27.0)
  hz = np.array([10.0, 700.0, 1000.0, 2500.0, 7999.0])
  np.testing.assert_allclose(features.mel_to_hz(features.hz_to_mel(hz)), hz)
  fb = features.mel_filterbank(16000, 512, 80)
  assert fb.shape == (257, 80) and (fb >= 0).all()
  # Unit area in Hz per filter (Slaney normalisation); the FFT grid samples a triangle well only
  # when it spans many bins, i.e. the upper half of the filters.
  area = fb.sum(0) * (16000 / 512)
  np.testing.assert_allclose(area[40:], 1.0, rtol=0.03)


def test_mel_times_locate_a_click():
  cfg = features.MelConfig()
  rng = np.random.default_rng(2)
  for _ in range(5):
    x = np.zeros(16000, np.float32)
    p = int(rng.integers(1000, 15000))
    x[p] = 1.0
    mel = features.log_mel(x, cfg)
    energy = np.exp(mel).sum(-1)
    t = features.mel_times(len(mel), cfg.frame_rate)
    # The Hann window peaks at the frame centre, so the loudest frame is the one centred nearest.
    assert abs(t[np.argmax(energy)] - p / 16000) <= 0.5 * cfg.hop_length / 16000 + 1e-9
  np.testing.assert_allclose(features.mel_times(3, 50.0), [0.01, 0.03, 0.05])


def test_mel_frames_per_video_frame():
  assert features.mel_frames_per_video_frame(features.MelConfig(), 25) == 2
  assert features.mel_frames_per_video_frame(features.MelConfig(), 50) == 1
  with pytest.raises(ValueError, match="integer multiple"):
    features.mel_frames_per_video_frame(features.MelConfig(), 30)


@pytest.mark.parametrize("orig_sr, target_sr", [(44100, 16000), (8000, 16000), (22050, 16000)])
def test_resample_sine(orig_sr, target_sr):
  dur = 0.537
  n = int(dur * orig_sr)
  f0 = 440.0
  x = np.sin(2 * np.pi * f0 * np.arange(n) / orig_sr).astype(np.float32)
  y = features.resample(x, orig_sr, target_sr)
  assert y.dtype == np.float32
  assert len(y) == math.ceil(n * target_sr / orig_sr)
  want = np.sin(2 * np.pi * f0 * np.arange(len(y)) / target_sr)
  mid = slice(len(y) // 10, -len(y) // 10)  # away from the filter's edge transients
  np.testing.assert_allclose(y[mid], want[mid], atol=2e-3)
  with pytest.raises(ValueError, match="positive"):
    features.resample(x, 0, 16000)


def test_log_mel_rejects_integer_audio():
  with pytest.raises(ValueError, match="float waveform"):
    features.log_mel(np.zeros(1000, np.int16))


# ===================================================================================== pipeline
import dataclasses  # noqa: E402

import jax  # noqa: E402

from avatar_jax.data import pipeline  # noqa: E402
from avatar_jax.data.synthdyad import generator as sd  # noqa: E402


def _small_config(**overrides):
  c = pipeline.default_config()
  c.synthdyad.render = False
  c.synthdyad.duration_s = 2.0  # T = 50 frames
  c.split_sizes.train, c.split_sizes.test, c.split_sizes.ood = 6, 3, 2
  c.clip_frames = 20
  c.batch_size = 4
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _generated(split, index, c):
  cfg = dataclasses.replace(
      sd.regime_for(split), duration_s=c.synthdyad.duration_s, resolution=c.synthdyad.resolution
  )
  return sd.make_sample(split, index, seed=c.synthdyad.seed, config=cfg, render=c.synthdyad.render)


def _assert_window_matches_generator(batch, split, c, keys=()):
  """Every example of `batch` equals its window of the generator output, mel recomputed."""
  mel_cfg = features.mel_config_from(c.features)
  t = c.clip_frames
  for b in range(len(batch["example_index"])):
    s = _generated(split, int(batch["example_index"][b]), c)
    t0 = int(batch["clip_start"][b])
    assert 0 <= t0 <= len(s["motion_self"]) - t
    for k in ("motion_self", "motion_partner", "flame56_self", "flame56_partner",
              "speaking_self", "speaking_partner") + tuple(k for k in keys if "video" in k):
      np.testing.assert_array_equal(batch[k][b], s[k][t0:t0 + t], err_msg=k)
    for stream in ("self", "partner"):
      mel = features.log_mel(s[f"audio_{stream}"], mel_cfg)  # 2 mel frames per video frame
      np.testing.assert_array_equal(batch[f"mel_{stream}"][b], mel[2 * t0:2 * (t0 + t)])
    for k in keys:
      if k.startswith("audio_"):
        np.testing.assert_array_equal(batch[k][b], s[k][640 * t0:640 * (t0 + t)])
    if "reference_image" in keys:
      np.testing.assert_array_equal(batch["reference_image"][b], s["reference_image"])
    assert batch["identity_self"][b] == s["identity_self"]
    assert batch["identity_partner"][b] == s["identity_partner"]


def test_train_batches_shapes_and_content():
  c = _small_config()
  it = pipeline.make(c, "train", seed=3, shard_index=0, shard_count=1)
  c_dim = len(sd.MOTION_CHANNELS)
  seen = []
  for _ in range(3):  # 12 examples: two epochs of 6, each epoch a permutation
    batch = next(it)
    assert batch["motion_self"].shape == (4, 20, c_dim) and batch["motion_self"].dtype == np.float32
    assert batch["flame56_partner"].shape == (4, 20, 56)
    assert batch["mel_self"].shape == (4, 40, 80) and batch["mel_partner"].dtype == np.float32
    assert batch["speaking_self"].shape == (4, 20) and batch["speaking_self"].dtype == bool
    assert batch["identity_self"].shape == (4,)
    assert "video" not in batch and "audio_self" not in batch
    seen += batch["example_index"].tolist()
    _assert_window_matches_generator(batch, "train", c)
  assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))
  assert seen[:6] != seen[6:]  # reshuffled each epoch
  other = pipeline.make(c, "train", seed=4, shard_index=0, shard_count=1)
  assert next(other)["example_index"].tolist() != seen[:4]


def test_optional_keys_with_video():
  c = _small_config(keep_keys=("video", "partner_video", "reference_image", "audio_mix"))
  c.synthdyad.render = True
  c.synthdyad.resolution = 32
  c.batch_size = 2
  batch = next(pipeline.make(c, "test", seed=0, shard_index=0, shard_count=1))
  assert batch["video"].shape == (2, 20, 32, 32, 3) and batch["video"].dtype == np.uint8
  assert batch["reference_image"].shape == (2, 32, 32, 3)
  assert batch["audio_mix"].shape == (2, 20 * 640)
  _assert_window_matches_generator(batch, "test", c, keys=c.keep_keys)
  c.synthdyad.render = False
  with pytest.raises(ValueError, match="render is False"):
    pipeline.make(c, "test", shard_index=0, shard_count=1)


def test_eval_tiles_every_window_once():
  c = _small_config()  # 3 test examples x floor(50 / 20) = 6 windows, batches of 4 + 2
  batches = list(pipeline.make(c, "test", shuffle=False, num_epochs=1, shard_index=0,
                               shard_count=1))
  assert [len(b["example_index"]) for b in batches] == [4, 2]
  pairs = [(int(i), int(s)) for b in batches for i, s in zip(b["example_index"], b["clip_start"])]
  assert pairs == [(i, s) for i in range(3) for s in (0, 20)]
  _assert_window_matches_generator(batches[1], "test", c)
  c.eval_windows = "full"
  c.clip_frames = 0
  full = next(pipeline.make(c, "ood", shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
  assert full["motion_self"].shape == (2, 50, len(sd.MOTION_CHANNELS))
  assert full["mel_self"].shape == (2, 100, 80)


def test_shards_are_disjoint():
  c = _small_config()
  c.batch_size = 2  # host batch 1 of 2 hosts
  ids = [
      [int(next(it)["example_index"][0]) for _ in range(3)]
      for it in (pipeline.make(c, "train", seed=0, shard_index=i, shard_count=2) for i in (0, 1))
  ]
  assert sorted(ids[0] + ids[1]) == list(range(6))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make(c, "train", seed=0, shard_index=0, shard_count=3)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_worker_count_does_not_change_batches_and_state_resumes(tmp_path):
  c = _small_config()
  keys = ("mel_self", "motion_partner", "flame56_self")
  ref_it = pipeline.make(c, "train", keys=keys, seed=1, shard_index=0, shard_count=1)
  ref = [next(ref_it) for _ in range(4)]
  c.worker_count = 2
  c.synthdyad.cache = True  # filled over 2 processes, then shipped to the 2 prefetch workers
  # Shard 1 of 2: the second half of each global batch, with workers too.
  ref = [{k: v[2:] for k, v in b.items()} for b in ref]
  it = pipeline.make(c, "train", keys=keys, seed=1, shard_index=1, shard_count=2)
  try:
    got = [next(it) for _ in range(2)]
    state = it.get_state()
    got += [next(it) for _ in range(2)]
    # Rewinding the same 2-worker iterator to a saved state gives the same next batch.
    it.set_state(state)
    _assert_batches_equal(next(it), ref[2])
  finally:
    it.close()
  for a, b in zip(ref, got):
    _assert_batches_equal(a, b)


def test_orbax_checkpoint_of_iterator_resumes_exactly(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  c = _small_config()
  it = pipeline.make(c, "train", seed=2, shard_index=0, shard_count=1)
  next(it)
  mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  mgr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  want = [next(it) for _ in range(2)]
  fresh = pipeline.make(c, "train", seed=2, shard_index=0, shard_count=1)
  mgr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for w in want:
    _assert_batches_equal(next(fresh), w)
  mgr.close()


def _concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_global_batch_order_does_not_depend_on_the_shard_count():
  """Shards p of n side by side are the 1-shard batch, step after step (across an epoch
  boundary: 6 examples, global batch 4), also after `set_state` from another shard count."""
  c = _small_config()
  keys = ("motion_self",)  # and the bookkeeping keys: example_index, clip_start
  make = lambda p, n: pipeline.make(c, "train", keys=keys, seed=3, shard_index=p, shard_count=n)
  its = {n: [make(p, n) for p in range(n)] for n in (1, 2, 4)}
  states, wants = [], []
  for _ in range(4):
    states.append(its[2][0].get_state())
    wants.append(next(its[1][0]))
    for n in (2, 4):
      _assert_batches_equal(_concat([next(it) for it in its[n]]), wants[-1])
  # The position is global: every shard of every count stands at the same one.
  assert all(it.get_state() == its[1][0].get_state() for n in (2, 4) for it in its[n])
  # Saved with 2 shards, resumed with 4 and with 1 (and the reverse): the same next batches.
  for n, m in ((2, 4), (2, 1), (4, 2)):
    src = [make(p, n) for p in range(n)]
    for _ in range(2):
      for it in src:
        next(it)
    dst = [make(p, m) for p in range(m)]
    for it in dst:
      it.set_state(src[0].get_state())
    for _ in range(2):
      _assert_batches_equal(_concat([next(it) for it in dst]), _concat([next(it) for it in src]))
  # A 2-shard position rewinds a 4-shard iterator.
  for it in its[4]:
    it.set_state(states[1])
  _assert_batches_equal(_concat([next(it) for it in its[4]]), wants[1])


def test_data_state_restores_from_another_process_count(tmp_path):
  """The data files of a 2-process checkpoint restore here (1 process); disagreeing or missing
  files are clear errors."""
  import json

  from avatar_jax import checkpointing

  c = _small_config()
  it = pipeline.make(c, "train", seed=2, shard_index=1, shard_count=2)
  next(it)
  for p in range(2):
    (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  fresh = pipeline.make(c, "train", seed=2, shard_index=0, shard_count=1)
  checkpointing.restore_data_state(tmp_path, fresh)
  ref = pipeline.make(c, "train", seed=2, shard_index=0, shard_count=1)
  next(ref)
  _assert_batches_equal(next(fresh), next(ref))
  (tmp_path / "process_1-of-2.json").write_text(json.dumps(fresh.get_state()))
  with pytest.raises(ValueError, match=r"differ between processes \[1\] and 0"):
    checkpointing.saved_data_state(tmp_path)
  (tmp_path / "process_1-of-2.json").unlink()
  with pytest.raises(ValueError, match=r"one process_<i>-of-<n>.json .* \['process_0-of-2.json'\]"):
    checkpointing.saved_data_state(tmp_path)


def test_too_few_examples_for_the_global_batch():
  c = _small_config(batch_size=8)  # 6 examples
  with pytest.raises(ValueError, match=r"'train' has 6 examples < global batch 8 \(host batch 4"):
    pipeline.make(c, "train", shard_index=0, shard_count=2)


def test_to_global_shards_leading_dim_over_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(0)
  batch = {
      "mel_self": rng.standard_normal((8, 6, 5)).astype(np.float32),
      "speaking_self": rng.random((8, 3)) > 0.5,
      "identity_self": np.arange(8, dtype=np.int32),
  }
  out = pipeline.to_global(batch, mesh)
  for k, v in batch.items():
    arr = out[k]
    assert arr.shape == v.shape and arr.dtype == v.dtype
    assert arr.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arr), v)
    shards = arr.addressable_shards
    assert len(shards) == 8
    for s in shards:
      assert s.data.shape[0] == 2  # 8 rows over data x fsdp = 4 shards, replicated over tensor
      np.testing.assert_array_equal(np.asarray(s.data), v[s.index])
  with pytest.raises(ValueError, match="not in the mesh"):
    pipeline.to_global(batch, mesh, axes=("data", "pipeline"))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.to_global({"x": np.zeros((6, 2))}, mesh)


# ===================================================================================== builders
import os  # noqa: E402

import scipy.io.wavfile  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from avatar_jax.data import media  # noqa: E402
from avatar_jax.data.builders import build as build_lib  # noqa: E402
from avatar_jax.data.builders.dualtalk import dualtalk_dataset_builder as dualtalk  # noqa: E402


def _assert_same_sample(record, sample, where):
  for k, v in sample.items():
    assert k in record, f"{where}: {k} missing"
    if k == "events":
      assert set(record[k]) == set(v)
      for kk in v:
        assert record[k][kk].dtype == v[kk].dtype, f"{where}: events/{kk}"
        np.testing.assert_array_equal(record[k][kk], v[kk], err_msg=f"{where}: events/{kk}")
    elif isinstance(v, np.ndarray):
      assert record[k].dtype == v.dtype and record[k].shape == v.shape, f"{where}: {k}"
      np.testing.assert_array_equal(record[k], v, err_msg=f"{where}: {k}")
    else:
      assert record[k] == v, f"{where}: {k}"


@pytest.fixture(scope="module")
def synthdyad_tfds(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sizes = dict(train_size=3, test_size=2, ood_size=1)
  build_lib.build("synthdyad/tiny", data_dir=data_dir, config_name="t3", **sizes)
  return data_dir, sizes


def test_synthdyad_builder_round_trips_generator_exactly(synthdyad_tfds):
  data_dir, sizes = synthdyad_tfds
  for split in ("train", "test", "ood"):
    source = tfds.data_source("synthdyad/t3", split=split, data_dir=data_dir)  # no TensorFlow
    assert len(source) == sizes[f"{split}_size"]
    gen_cfg = dataclasses.replace(sd.regime_for(split), resolution=32, duration_s=2.0)
    for i in range(len(source)):
      record = source[i]
      assert record["index"] == i
      want = sd.make_sample(split, i, seed=0, config=gen_cfg, render=True)
      assert record["video"].shape == (50, 32, 32, 3)
      _assert_same_sample(record, want, f"{split}[{i}]")


def test_pipeline_reads_tfds_like_the_generator(synthdyad_tfds):
  data_dir, _ = synthdyad_tfds
  c = _small_config(keep_keys=("video", "audio_partner"))
  c.synthdyad.render, c.synthdyad.resolution = True, 32
  c.split_sizes.test = 2
  c.batch_size = 2
  from_gen = list(pipeline.make(c, "test", shuffle=False, num_epochs=1, shard_index=0,
                                shard_count=1))
  c.source = "tfds"
  c.tfds.name, c.tfds.data_dir = "synthdyad/t3", data_dir
  from_tfds = list(pipeline.make(c, "test", shuffle=False, num_epochs=1, shard_index=0,
                                 shard_count=1))
  assert len(from_gen) == len(from_tfds) == 2  # 2 examples x 2 windows of 20 frames
  for a, b in zip(from_gen, from_tfds):
    _assert_batches_equal(a, b)
  # Without video keys the TFDS source leaves the videos undecoded; the batches are unchanged.
  c.keep_keys = ()
  no_video = next(pipeline.make(c, "test", shuffle=False, num_epochs=1, shard_index=0,
                                shard_count=1))
  assert pipeline.make_source(c, "test").skip == ("video", "partner_video", "reference_image")
  want = {k: v for k, v in from_gen[0].items() if k not in ("video", "audio_partner")}
  _assert_batches_equal(no_video, want)


def _write_dualtalk_folder(root, rng, convs):
  """DualTalk layout: <split>/<name>_speaker{1,2}.{npz,wav}; returns the arrays written."""
  written = {}
  for split, names in convs.items():
    os.makedirs(root / split, exist_ok=True)
    for name, t in names:
      for k in (1, 2):
        tk = t + (k - 1)  # speaker 2 has one extra frame: the builder crops to the shorter
        exp = rng.standard_normal((tk, 50)).astype(np.float32)
        pose = rng.standard_normal((tk, 6)).astype(np.float32) * 0.1
        np.savez(root / split / f"{name}_speaker{k}.npz", exp=exp, pose=pose,
                 shape=np.zeros((tk, 100), np.float32))
        wav = (rng.standard_normal(int(tk * 22050 / 25)) * 3000).astype(np.int16)
        scipy.io.wavfile.write(root / split / f"{name}_speaker{k}.wav", 22050, wav)
        written[(split, name, k)] = (exp, pose)
  return written


def test_dualtalk_builder(tmp_path):
  rng = np.random.default_rng(7)
  src = tmp_path / "DualTalk_Dataset"
  convs = {"train": [("b_conv", 30), ("a_conv", 41)], "test": [("c_conv", 27)]}
  written = _write_dualtalk_folder(src, rng, convs)
  data_dir = str(tmp_path / "tfds")
  build_lib.build("dualtalk", data_dir=data_dir, manual_dir=str(src))
  for split, names in convs.items():
    source = tfds.data_source("dualtalk", split=split, data_dir=data_dir)
    assert len(source) == 2 * len(names)
    for n, (name, t) in enumerate(sorted(names)):
      for me in (1, 2):
        rec = source[2 * n + me - 1]
        other = 3 - me
        assert rec["self_speaker"] == me and rec["fps"] == 25 and rec["sample_rate"] == 16000
        assert (rec["name"].decode() if isinstance(rec["name"], bytes) else rec["name"]) == name
        for key, spk in (("flame56_self", me), ("flame56_partner", other)):
          exp, pose = written[(split, name, spk)]
          want = np.zeros((t, 56), np.float32)
          want[:, 0:50] = exp[:t]
          want[:, 50:53] = pose[:t, 3:6]  # jaw
          want[:, 53:56] = pose[:t, 0:3]  # global head rotation
          np.testing.assert_array_equal(rec[key], want)
        audio = media.read_audio(src / split / f"{name}_speaker{me}.wav", 16000)
        s = len(rec["audio_self"])
        assert abs(s - t * 640) <= 2  # shorter speaker's audio at 16 kHz
        np.testing.assert_array_equal(rec["audio_self"], audio[:s])
  # The pipeline runs on it: flame56 + mel, no SynthDyad-only keys.
  c = _small_config(source="tfds", clip_frames=10, batch_size=2)
  c.tfds.name, c.tfds.data_dir = "dualtalk", data_dir
  batch = next(pipeline.make(c, "train", seed=0, shard_index=0, shard_count=1))
  assert batch["flame56_self"].shape == (2, 10, 56) and batch["mel_partner"].shape == (2, 20, 80)
  assert "motion_self" not in batch and (batch["identity_self"] == -1).all()


def test_dualtalk_errors_name_file_and_key(tmp_path):
  t = 12
  np.savez(tmp_path / "x_speaker1.npz", exp=np.zeros((t, 50)))
  with pytest.raises(KeyError, match=r"x_speaker1.npz: missing key 'pose'"):
    dualtalk.load_speaker_npz(str(tmp_path / "x_speaker1.npz"))
  np.savez(tmp_path / "y_speaker1.npz", exp=np.zeros((t, 49)), pose=np.zeros((t, 6)))
  with pytest.raises(ValueError, match=r"y_speaker1.npz: key 'exp' must have shape \[T, 50\]"):
    dualtalk.load_speaker_npz(str(tmp_path / "y_speaker1.npz"))
  np.savez(tmp_path / "z_speaker1.npz", exp=np.zeros((t, 50)), pose=np.zeros((t + 1, 6)))
  with pytest.raises(ValueError, match="z_speaker1.npz: 'exp' has 12 frames but 'pose' has 13"):
    dualtalk.load_speaker_npz(str(tmp_path / "z_speaker1.npz"))
  # Missing wav, reported by the builder with its path.
  src = tmp_path / "src"
  _write_dualtalk_folder(src, np.random.default_rng(0), {"train": [("q", 5)]})
  os.remove(src / "train" / "q_speaker2.wav")
  with pytest.raises(FileNotFoundError, match="q_speaker2.wav"):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "tfds"), manual_dir=str(src))
  with pytest.raises(FileNotFoundError, match="needs --manual_dir"):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "tfds2"), manual_dir=str(tmp_path / "no"))
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "a_speaker1.npz").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="expected split folders"):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "tfds3"), manual_dir=str(tmp_path / "flat"))


def test_cache_gives_identical_batches():
  c = _small_config()
  ref = pipeline.make(c, "train", seed=5, shard_index=0, shard_count=1)
  want = [next(ref) for _ in range(3)]  # 12 examples over 6 samples: the cache gets hits
  c.synthdyad.cache = True
  it = pipeline.make(c, "train", seed=5, shard_index=0, shard_count=1)
  got = [next(it) for _ in range(3)]
  for a, b in zip(want, got):
    _assert_batches_equal(a, b)


def test_window_rendering_equals_slicing_the_full_render():
  src = pipeline.SynthDyadSource("test", 3, seed=2, duration_s=2.0, resolution=48)
  full = src[1]  # == make_sample(..., render=True)
  part = src.get(1, render=False)
  assert "video" not in part
  for key in ("video", "partner_video"):
    for start, stop in ((0, 1), (7, 33), (49, 50)):
      np.testing.assert_array_equal(src.render_window(part, key, start, stop),
                                    full[key][start:stop])
  np.testing.assert_array_equal(src.render_window(part, "reference_image", 0, 1),
                                full["reference_image"])


def test_build_command_line(tmp_path):
  import subprocess
  import sys

  data_dir = str(tmp_path / "tfds")
  cmd = [sys.executable, "-m", "avatar_jax.data.builders.build", "synthdyad/tiny", "--render=false",
         "--train_size=2", "--test_size=1", "--ood_size=1", "--config_name=cli", f"--data_dir={data_dir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
  src = tfds.data_source("synthdyad/cli", split="train", data_dir=data_dir)
  assert len(src) == 2 and "video" not in src[0]
  gen_cfg = dataclasses.replace(sd.regime_for("train"), resolution=32, duration_s=2.0)
  _assert_same_sample(src[1], sd.make_sample("train", 1, config=gen_cfg, render=False), "cli[1]")


# ============================================================================== keys, facts, registry
from avatar_jax.data import sources  # noqa: E402

_BOOKKEEPING = {"example_index", "clip_start", "identity_self", "identity_partner"}


def test_keys_produce_only_what_is_asked_and_compute_nothing_else(monkeypatch):
  c = _small_config()
  full = next(pipeline.make(c, "train", seed=7, shard_index=0, shard_count=1))
  # No mel key asked: the log-mel front end must not run at all.
  monkeypatch.setattr(features, "log_mel", lambda *a, **k: pytest.fail("log_mel was computed"))
  got = next(pipeline.make(c, "train", keys=("motion_self", "speaking_partner"), seed=7,
                           shard_index=0, shard_count=1))
  assert set(got) == {"motion_self", "speaking_partner"} | _BOOKKEEPING
  for k in got:  # same windows as the default keys for the same seed
    np.testing.assert_array_equal(got[k], full[k], err_msg=k)
  monkeypatch.undo()
  mel = next(pipeline.make(c, "train", keys=("mel_partner",), seed=7, shard_index=0,
                           shard_count=1))
  assert set(mel) == {"mel_partner"} | _BOOKKEEPING
  np.testing.assert_array_equal(mel["mel_partner"], full["mel_partner"])


def test_keys_without_video_never_render(monkeypatch):
  c = _small_config()
  c.synthdyad.render, c.synthdyad.resolution, c.batch_size = True, 32, 2
  monkeypatch.setattr(sources.SynthDyadSource, "render_window",
                      lambda *a, **k: pytest.fail("rendered without a video key"))
  b = next(pipeline.make(c, "test", keys=("flame56_self", "audio_mix"), shuffle=False,
                         shard_index=0, shard_count=1))
  assert b["audio_mix"].shape == (2, 20 * 640) and "video" not in b
  monkeypatch.undo()
  v = next(pipeline.make(c, "test", keys=("partner_video",), shuffle=False, shard_index=0,
                         shard_count=1))
  assert set(v) == {"partner_video"} | _BOOKKEEPING
  assert v["partner_video"].shape == (2, 20, 32, 32, 3)
  _assert_window_matches_generator({**v, **b, **next(pipeline.make(
      c, "test", shuffle=False, shard_index=0, shard_count=1))}, "test", c, keys=("partner_video",))


def test_unknown_keys_are_a_clear_error():
  c = _small_config()
  with pytest.raises(ValueError, match=r"cannot produce batch keys \['latent', 'video'\].*"
                     r"render is False.*it has \[.*'mel_mix'.*'motion_self'"):
    pipeline.make(c, "train", keys=("motion_self", "video", "latent"), shard_index=0,
                  shard_count=1)


def test_facts_come_from_the_data_config():
  c = pipeline.default_config()
  assert pipeline.facts(c) == dict(fps=25, mel_rate=50.0, n_mels=80, sample_rate=16000)
  c.features.n_mels, c.features.hop_length = 40, 160
  c.synthdyad.fps = 50
  assert pipeline.facts(c) == dict(fps=50, mel_rate=100.0, n_mels=40, sample_rate=16000)
  c.source = "tfds"
  c.tfds.fps = 30
  assert pipeline.facts(c)["fps"] == 30
  c.source = "synthdyad"
  c.synthdyad.sample_rate = 22050
  with pytest.raises(ValueError, match="features.sample_rate=16000 but source 'synthdyad' has "
                     "audio at 22050 Hz"):
    pipeline.facts(c)


def test_source_registry():
  c = _small_config(source="nope")
  with pytest.raises(ValueError, match=r"'nope' is not a registered source; registered: "
                     r"\['arrays', 'synthdyad', 'tfds'"):
    pipeline.make(c, "train", shard_index=0, shard_count=1)

  @sources.register("ramp")
  class Ramp:
    """5 examples of 30 frames: flame56 = example index + frame / 100."""
    keys = ("flame56_self", "flame56_partner")

    @classmethod
    def from_config(cls, config, split, keys=None):
      return cls()

    @classmethod
    def rates(cls, config):
      return 25, 16000

    def __len__(self):
      return 5

    def num_frames(self, i):
      return 30

    def fetch(self, i, keys=None):
      x = np.broadcast_to((i + np.arange(30) / 100)[:, None], (30, 56)).astype(np.float32)
      return {"flame56_self": x, "flame56_partner": -x}

  try:
    c = _small_config(source="ramp", mel_streams=(), clip_frames=10, batch_size=5)
    b = next(pipeline.make(c, "train", seed=0, shard_index=0, shard_count=1))
    assert sorted(b["example_index"]) == list(range(5)) and (b["identity_self"] == -1).all()
    want = b["example_index"][:, None] + (b["clip_start"][:, None] + np.arange(10)) / 100
    np.testing.assert_allclose(b["flame56_self"][..., 0], want, rtol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
      sources.register("ramp")(dict)
  finally:
    sources._SOURCES.pop("ramp")


# ===================================================================================== device prefetch
def test_prefetch_to_device_keeps_order_and_checkpoints_the_consumed_position(tmp_path):
  import grain
  import orbax.checkpoint as ocp

  mesh = jax.make_mesh((8,), ("data",))
  c = _small_config(batch_size=8)
  c.split_sizes.train = 16
  keys = ("motion_self", "mel_self")
  plain = pipeline.make(c, "train", keys=keys, seed=5, shard_index=0, shard_count=1)
  want, states = [], [plain.get_state()]
  for _ in range(6):
    want.append(next(plain))
    states.append(plain.get_state())

  it = pipeline.prefetch_to_device(
      pipeline.make(c, "train", keys=keys, seed=5, shard_index=0, shard_count=1), mesh, size=3)
  got = [next(it) for _ in range(2)]
  import time
  time.sleep(0.5)  # let the thread run 3 batches ahead
  assert it.get_state() == states[2]  # the next batch to consume, not the prefetched ones
  mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
  mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mgr.wait_until_finished()
  got += [next(it) for _ in range(2)]
  for g, w in zip(got, want):
    assert isinstance(g["mel_self"], jax.Array) and len(g["mel_self"].sharding.device_set) == 8
    _assert_batches_equal({k: np.asarray(v) for k, v in g.items()}, w)
  it.set_state(states[1])  # rewind: prefetched batches are dropped
  _assert_batches_equal({k: np.asarray(v) for k, v in next(it).items()}, want[1])
  it.close()

  fresh = pipeline.prefetch_to_device(
      pipeline.make(c, "train", keys=keys, seed=5, shard_index=0, shard_count=1), mesh)
  mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for w in want[2:5]:
    _assert_batches_equal({k: np.asarray(v) for k, v in next(fresh).items()}, w)
  fresh.close()
  mgr.close()


def test_prefetch_to_device_ends_and_reraises():
  mesh = jax.make_mesh((8,), ("data",))
  c = _small_config(batch_size=8)
  c.split_sizes.test = 8
  c.synthdyad.duration_s = 0.8  # 20 frames: one window each
  it = pipeline.prefetch_to_device(pipeline.make(c, "test", shuffle=False, num_epochs=1,
                                                 shard_index=0, shard_count=1), mesh)
  assert len(list(it)) == 1
  with pytest.raises(StopIteration):
    next(it)
  c.batch_size = 6  # 6 rows over 8 devices: to_global fails in the thread, raised here
  bad = pipeline.prefetch_to_device(pipeline.make(c, "test", shuffle=False, num_epochs=1,
                                                  shard_index=0, shard_count=1), mesh)
  with pytest.raises(ValueError, match="divisible"):
    next(bad)
  bad.close()


def test_synthdyad_export_reads_back_through_the_dualtalk_builder(tmp_path):
  """SynthDyad's 56-d export in DualTalk's layout, built by the dualtalk builder, gives the
  SynthDyad source's own flame56 tracks and voices (16-bit rounding of the audio aside)."""
  from avatar_jax.data.synthdyad import export  # pylint: disable=g-import-not-at-top
  export.export(str(tmp_path / "dt"), {"test": 2})
  data_dir = str(tmp_path / "tfds")
  build_lib.build("dualtalk", data_dir=data_dir, manual_dir=str(tmp_path / "dt"))
  built = tfds.data_source("dualtalk", split="test", data_dir=data_dir)
  src = pipeline.SynthDyadSource("test", 4, render=False)
  assert len(built) == 4
  for k in range(2):
    want = src.get(2 * k, render=False)
    for me, (a, b) in enumerate((("self", "partner"), ("partner", "self"))):
      rec = built[2 * k + me]
      t = len(rec["flame56_self"])
      assert t == len(want["flame56_self"])
      np.testing.assert_allclose(rec["flame56_self"], want[f"flame56_{a}"], atol=1e-6)
      np.testing.assert_allclose(rec["flame56_partner"], want[f"flame56_{b}"], atol=1e-6)
      np.testing.assert_allclose(rec["audio_self"], want[f"audio_{a}"][:t * 640], atol=1e-4)


def test_dualtalk_builder_rejects_broken_conversations(tmp_path):
  """Missing partner, NaNs, and length mismatches beyond 0.2 s are errors naming the file;
  within the tolerance every track is cropped to the shortest."""
  def folder(name, edit):
    root = tmp_path / name
    _write_dualtalk_folder(root, np.random.default_rng(0), {"train": [("q", 40)]})
    edit(root / "train")
    return str(root)

  def build(root):
    build_lib.build("dualtalk", data_dir=str(tmp_path / ("tfds_" + os.path.basename(root))),
                    manual_dir=root)

  with pytest.raises(FileNotFoundError, match=r"q_speaker2.npz \(the partner of q_speaker1.npz"):
    build(folder("nopartner", lambda d: os.remove(d / "q_speaker2.npz")))

  def nan(d):
    z = dict(np.load(d / "q_speaker1.npz"))
    z["exp"][7, 3] = np.nan
    np.savez(d / "q_speaker1.npz", **z)
  with pytest.raises(ValueError, match=r"q_speaker1.npz: key 'exp' has non-finite values \(first at frame 7"):
    build(folder("nan", nan))

  def longer(d):
    z = dict(np.load(d / "q_speaker2.npz"))
    np.savez(d / "q_speaker2.npz", exp=np.concatenate([z["exp"]] * 2), pose=np.concatenate([z["pose"]] * 2))
  with pytest.raises(ValueError, match=r"speakers have 40 and 82 frames"):
    build(folder("long", longer))

  def short_audio(d):
    scipy.io.wavfile.write(d / "q_speaker1.wav", 16000, np.zeros(16000, np.int16))
  with pytest.raises(ValueError, match=r"q_speaker1: motion lasts 1.60 s .* but audio 1.00 s"):
    build(folder("short", short_audio))
