"""Pre-encoded arrays: the encode job (mel and system encoders), resumption, the 'arrays' source."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from avatar_jax.data import arrays, encoding, pipeline


def _config():
  c = ml_collections.ConfigDict()
  c.data = pipeline.default_config()
  d = c.data
  d.synthdyad.render = False
  d.synthdyad.duration_s = 2.0  # 50 frames
  d.split_sizes.train, d.split_sizes.test, d.split_sizes.ood = 7, 3, 2
  d.clip_frames, d.batch_size = 20, 4
  d.features.n_mels = 40
  return c


def _as_arrays(data, root):
  a = data.copy_and_resolve_references()
  a.source, a.arrays.dir = "arrays", str(root)
  return a


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  root = tmp_path_factory.mktemp("arrays")
  encoding.encode(_config(), str(root), "mel", shard_size=3, progress=False)
  return root


def test_record_pack_round_trip():
  rec = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.int32(-4),
         "b": np.array([True, False]), "u": np.zeros((0, 5), np.uint8)}
  got = arrays.unpack(arrays.pack(rec))
  for k, v in rec.items():
    assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v)
    np.testing.assert_array_equal(got[k], v)
  assert set(arrays.unpack(arrays.pack(rec), keys={"a"})) == {"a"}


def test_arrays_batches_equal_the_on_the_fly_batches(encoded):
  c = _config()
  meta = arrays.read_metadata(str(encoded))
  assert meta["encoder"] == "mel" and meta["splits"]["train"] == dict(num_examples=7, shard_size=3)
  assert meta["keys"]["mel_mix"] == dict(dtype="<f4", shape=[40], per_frame=2.0)
  assert meta["keys"]["speaking_self"] == dict(dtype="|b1", shape=[], per_frame=1.0)
  assert sorted(os.listdir(encoded / "train")) == [
      f"shard-{s:05d}.{e}" for s in range(3) for e in ("array_record", "json")]
  a = _as_arrays(c.data, encoded)
  assert pipeline.facts(a) == pipeline.facts(c.data) == dict(fps=25, mel_rate=50.0, n_mels=40,
                                                              sample_rate=16000)
  # Train windows: same seeds -> same examples, offsets and values (the mel is sliced from the
  # stored whole-clip mel, computed exactly as on the fly).
  for keys in (None, ("motion_self", "mel_self", "mel_partner"), ("mel_mix", "speaking_partner")):
    gen = pipeline.make(c.data, "train", keys=keys, seed=11, shard_index=0, shard_count=1)
    arr = pipeline.make(a, "train", keys=keys, seed=11, shard_index=0, shard_count=1)
    for _ in range(3):
      _assert_batches_equal(next(arr), next(gen))
  a.cache = True  # clips read once into memory: the same batches
  gen = pipeline.make(c.data, "train", seed=12, shard_index=0, shard_count=1)
  arr = pipeline.make(a, "train", seed=12, shard_index=0, shard_count=1)
  for _ in range(3):
    _assert_batches_equal(next(arr), next(gen))
  a.cache = False
  # Eval tiles, and a shard of two hosts.
  gen = list(pipeline.make(c.data, "test", shuffle=False, num_epochs=1, shard_index=1,
                           shard_count=2))
  arr = list(pipeline.make(a, "test", shuffle=False, num_epochs=1, shard_index=1, shard_count=2))
  assert len(arr) == len(gen) == 2
  for x, y in zip(arr, gen):
    _assert_batches_equal(x, y)


def test_arrays_source_errors(encoded, tmp_path):
  c = _config()
  a = _as_arrays(c.data, encoded)
  with pytest.raises(ValueError, match=r"cannot produce batch keys \['audio_self'\]"):
    pipeline.make(a, "train", keys=("audio_self",), shard_index=0, shard_count=1)
  a.features.n_mels = 80
  with pytest.raises(ValueError, match=r"metadata.json: its mel features were encoded with "
                     r"\{'n_mels': 40\} but config.data.features has \{'n_mels': 80\}"):
    pipeline.facts(a)
  b = _as_arrays(c.data, tmp_path)
  with pytest.raises(FileNotFoundError, match="metadata.json does not exist"):
    pipeline.make(b, "train", shard_index=0, shard_count=1)
  with pytest.raises(KeyError, match=r"no split 'val'; it has \['ood', 'test', 'train'\]"):
    arrays.ArraysSource(str(encoded), "val")
  # Re-encoding into the directory with another data config or encoder names the field.
  other = _config()
  other.data.synthdyad.seed = 3
  with pytest.raises(ValueError, match=r"was written with data=.*this run has data=.*new --out"):
    encoding.encode(other, str(encoded), "mel", progress=False)


def test_encode_resumes_after_an_interrupted_shard(encoded, tmp_path):
  c = _config()
  root = tmp_path / "out"
  encoding.encode(c, str(root), "mel", splits=["train"], shard_size=3, progress=False,
                  max_shards=1)
  assert os.path.exists(arrays.marker_path(str(root), "train", 0))
  assert not os.path.exists(arrays.marker_path(str(root), "train", 1))
  with pytest.raises(FileNotFoundError, match="shard-00001.json is missing"):
    arrays.ArraysSource(str(root), "train")
  # Shard 1 was being written when the job died: a truncated file without its marker.
  with open(arrays.shard_path(str(root), "train", 1), "wb") as f:
    f.write(b"\x00" * 100)
  done = os.stat(arrays.shard_path(str(root), "train", 0)).st_mtime_ns
  encoding.encode(c, str(root), "mel", splits=["train"], shard_size=3, progress=False)
  assert os.stat(arrays.shard_path(str(root), "train", 0)).st_mtime_ns == done  # not redone
  resumed, whole = arrays.ArraysSource(str(root), "train"), arrays.ArraysSource(str(encoded),
                                                                               "train")
  assert len(resumed) == len(whole) == 7
  for i in range(7):
    _assert_batches_equal(resumed[i], whole[i])
  with pytest.raises(ValueError, match=r"\(split 'train'\) was written with shard_size=3, this "
                     "run has shard_size=4"):
    encoding.encode(c, str(root), "mel", splits=["train"], shard_size=4, progress=False)


def test_record_compression_changes_the_file_not_the_records(encoded, tmp_path):
  """Records are written raw by default (fastest to read); zstd and snappy are options that
  readers need not know about."""
  c = _config()
  raw = arrays.shard_path(str(encoded), "ood", 0)
  payload = sum(len(r) for r in _records(raw))
  assert os.path.getsize(raw) >= payload  # stored as is
  root = tmp_path / "zstd"
  encoding.encode(c, str(root), "mel", splits=["ood"], shard_size=3, progress=False,
                  compression="zstd")
  packed = arrays.shard_path(str(root), "ood", 0)
  assert _records(packed) == _records(raw)
  # (files grow in 64-KiB blocks) log-mels and flags do compress somewhat
  assert os.path.getsize(packed) < os.path.getsize(raw)
  for a, b in zip(arrays.ArraysSource(str(root), "ood"), arrays.ArraysSource(str(encoded), "ood")):
    _assert_batches_equal(a, b)
  with pytest.raises(ValueError, match=r"compression must be one of \['none', 'snappy', "
                     r"'zstd'\], got 'lz4'"):
    encoding.encode(c, str(tmp_path / "bad"), "mel", progress=False, compression="lz4")


def _records(path):
  import grain  # pylint: disable=g-import-not-at-top
  ds = grain.sources.ArrayRecordDataSource([path])
  return [ds[i] for i in range(len(ds))]


def test_system_encoder_stores_its_outputs_at_their_rate(monkeypatch, tmp_path):
  """`--encoder WORKDIR`: System.encode on whole clips (e.g. a latent at 1/5 of the frame rate)
  stored beside the per-frame targets; windows are cut at the latent's rate."""
  from avatar_jax import trainer

  class Toy:
    def data_spec(self):
      return type("Spec", (), {"keys": ("mel_self", "motion_self")})()

    def encode(self, model, batch):
      b, t, m = batch["mel_self"].shape  # [B, 2T, M] -> [B, T/5, M]: mean over 10 mel frames
      return {"latent": batch["mel_self"].reshape(b, t // 10, 10, m).mean(2) * model}

  monkeypatch.setattr(trainer, "restore_model", lambda workdir: (Toy(), 2.0, None, 7))
  c = _config()
  root = tmp_path / "latents"
  encoding.encode(c, str(root), str(tmp_path / "run"), splits=["train"], shard_size=4,
                  batch_size=3, progress=False)
  meta = arrays.read_metadata(str(root))
  assert meta["encoder"] == f"{tmp_path / 'run'}@7"
  assert meta["keys"]["latent"] == dict(dtype="<f4", shape=[40], per_frame=0.2)
  assert set(meta["keys"]) == {"latent", "flame56_self", "flame56_partner", "motion_self",
                               "motion_partner", "speaking_self", "speaking_partner",
                               "mel_self", "mel_partner", "mel_background", "mel_mix"}
  assert meta["keys"]["mel_partner"]["per_frame"] == 2.0   # the audio features, beside the latents
  a = _as_arrays(c.data, root)
  clips = pipeline.clips(c.data, "train", keys=("mel_self",))  # on the fly
  arr = pipeline.make(a, "train", keys=("latent", "motion_self"), seed=0, shard_index=0,
                      shard_count=1)
  for _ in range(2):
    x = next(arr)
    assert x["latent"].shape == (4, 4, 40)  # 20-frame windows: 4 latent rows
    assert (x["clip_start"] % 5 == 0).all()  # windows start on a latent row
    for b in range(4):
      t0 = int(x["clip_start"][b])
      clip_mel = clips[int(x["example_index"][b])]
      np.testing.assert_allclose(
          x["latent"][b], 2.0 * clip_mel["mel_self"][2 * t0:2 * t0 + 40].reshape(4, 10, 40).mean(1),
          rtol=1e-6)
  a.clip_frames = 18
  with pytest.raises(ValueError, match="clip_frames=18 must be a multiple of 5"):
    pipeline.make(a, "train", keys=("latent",), shard_index=0, shard_count=1)


def test_encode_command_line(tmp_path):
  out = tmp_path / "cli"
  cmd = [sys.executable, "-m", "avatar_jax.encode", "--config", "configs/quickstart.py",
         f"--out={out}", "--splits=ood", "--shard_size=40", "--config.data.split_sizes.ood=3"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
  assert r.returncode == 0, r.stderr[-3000:]
  meta = json.loads((out / "metadata.json").read_text())
  assert meta["splits"] == {"ood": {"num_examples": 3, "shard_size": 40}}
  assert meta["features"]["n_mels"] == 40 and meta["keys"]["mel_self"]["shape"] == [40]
  assert len(arrays.ArraysSource(str(out), "ood")) == 3


def test_synthdyad_truth_follows_arrays_back_to_the_generator(encoded):
  """The 'synthdyad' evaluator scores runs trained from pre-encoded SynthDyad: the truth of
  each window is regenerated from the generator config stored in the arrays' metadata."""
  from avatar_jax.evals import motion  # pylint: disable=g-import-not-at-top

  c = _config()
  a = ml_collections.ConfigDict({"data": _as_arrays(c.data, encoded)})
  a.data.synthdyad.seed = 99          # ignored: the arrays' metadata decides
  batch = {"example_index": np.array([2, 0]), "clip_start": np.array([5, 0]),
           "_frames": np.array([20, 20])}
  got = motion.truth(a, "test", batch)
  want = motion.truth(c, "test", batch)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["motion_self"], w["motion_self"])
    np.testing.assert_array_equal(g["events"]["start"], w["events"]["start"])
  # And the regenerated truth is the clip the arrays hold.
  arr = next(pipeline.make(a.data, "test", shuffle=False, num_epochs=1, shard_index=0,
                           shard_count=1, keys=("motion_self",)))
  n = arr["motion_self"].shape[1]
  win = {"example_index": arr["example_index"], "clip_start": arr["clip_start"],
         "_frames": np.full(len(arr["example_index"]), n)}
  for row, t in zip(arr["motion_self"], motion.truth(a, "test", win)):
    np.testing.assert_array_equal(row, t["motion_self"])
  # A directory encoded from another source has no truth: a clear error.
  meta_path = encoded / "metadata.json"
  meta = json.loads(meta_path.read_text())
  try:
    meta["data"]["source"] = "tfds"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="SynthDyad truth.*use type 'flame56'"):
      motion.truth(a, "test", batch)
  finally:
    meta["data"]["source"] = "synthdyad"
    meta_path.write_text(json.dumps(meta))
