"""Bad data out: every reader and entry point turns a broken input into one clear error naming
the file and what was expected; never a silently wrong sample. Property-based (hypothesis) over
the WAV reader, the DualTalk npz loader, the arrays records and the config-argument parser."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import av
import hypothesis
import ml_collections
import numpy as np
import pytest
import scipy.io.wavfile
from hypothesis import strategies as st

import trainer_harness as harness
from avatar_jax import config_lib
from avatar_jax.data import arrays, encoding, media, pipeline
from avatar_jax.data.builders.dualtalk import dualtalk_dataset_builder as dualtalk

SETTINGS = hypothesis.settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
NON_UTF8 = os.fsdecode(b"clip_\xff\xfe")   # a name as os.listdir gives it on a Latin-1 disk


def _tone(seconds=0.5, sr=16000):
  return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def _frames(t=10, size=16):
  frames = np.zeros((t, size, size, 3), np.uint8)
  frames[:, 4:12, 4:12] = 200
  return frames


def _valid_wav(path, sr=16000):
  media.write_wav(path, _tone(sr=sr), sr)
  return path


# ------------------------------------------------------------------------------- media readers
def _truncated_wav(d):
  data = open(_valid_wav(d / "full.wav"), "rb").read()
  (d / "cut.wav").write_bytes(data[:len(data) // 2])
  return d / "cut.wav"


def _nan_wav(d):
  x = _tone()
  x[100] = np.nan
  scipy.io.wavfile.write(d / "nan.wav", 16000, x)
  return d / "nan.wav"


def _inf_wav(d):
  x = _tone()
  x[7] = np.inf
  scipy.io.wavfile.write(d / "inf.wav", 16000, x)
  return d / "inf.wav"


def _write(name, data: bytes):
  def make(d):
    (d / name).write_bytes(data)
    return d / name
  return make


def _folder(name):
  def make(d):
    (d / name).mkdir()
    return d / name
  return make


def _mp4(name, audio, cut=None):
  def make(d):
    media.write_mp4(d / name, _frames(), 25, audio=audio)
    if cut is not None:
      data = open(d / name, "rb").read()
      (d / name).write_bytes(data[:int(len(data) * cut)])
    return d / name
  return make


def _wav_of(name, sr, pcm):
  def make(d):
    scipy.io.wavfile.write(d / name, sr, pcm)
    return d / name
  return make


AUDIO_CASES = {
    # case: (make the file, error type, message pattern after the file name)
    "truncated_wav": (_truncated_wav, ValueError, r"cut\.wav: truncated WAV file .* expected"),
    "header_only_wav": (lambda d: _write("head.wav", _valid_wav(d / "f.wav").read_bytes()[:30])(d),
                        ValueError, r"head\.wav: not a readable WAV file"),
    "empty_file": (_write("empty.wav", b""), ValueError,
                   r"empty\.wav is empty \(0 bytes\); expected"),
    "no_samples_wav": (_wav_of("zero.wav", 16000, np.zeros(0, np.int16)), ValueError,
                       r"zero\.wav: has no audio samples"),
    "nan_wav": (_nan_wav, ValueError,
                r"nan\.wav: 1 non-finite \(NaN/Inf\) samples, the first at sample 100"),
    "inf_wav": (_inf_wav, ValueError, r"inf\.wav: 1 non-finite .* at sample 7"),
    "six_channels": (_wav_of("six.wav", 16000, np.zeros((100, 6), np.int16)), ValueError,
                     r"six\.wav: expected mono or stereo audio, found shape \(100, 6\)"),
    "rate_1hz": (_wav_of("slow.wav", 1, np.zeros(100, np.int16)), ValueError,
                 r"slow\.wav: sample rate 1 Hz; expected audio at >= 4000 Hz"),
    "folder_as_wav": (_folder("dir.wav"), ValueError, r"dir\.wav is a folder; expected"),
    "folder_as_mp4": (_folder("dir.mp4"), ValueError, r"dir\.mp4 is a folder; expected"),
    "missing": (lambda d: d / "missing.wav", FileNotFoundError, r"missing\.wav does not exist"),
    "empty_mp4": (_write("empty.mp4", b""), ValueError, r"empty\.mp4 is empty"),
    "junk_mp4": (_write("junk.mp4", b"\x00" * 64), ValueError,
                 r"junk\.mp4: not a readable media file"),
    "video_without_audio": (_mp4("silent.mp4", None), ValueError,
                            r"silent\.mp4: has no audio stream \(found \['video'\]\)"),
}


@pytest.mark.parametrize("cut", [0.5, 0.8, 0.9, 0.95])
def test_truncated_mp4_never_reads(cut, tmp_path):
  path = _mp4("cut.mp4", _tone(0.4), cut=cut)(tmp_path)
  with pytest.raises(ValueError, match=r"cut\.mp4: (not a readable media file|the audio stream "
                     r"has no codec parameters|has no audio stream .* a file cut short)"):
    media.read_audio(path)


@pytest.mark.parametrize("case", sorted(AUDIO_CASES))
def test_audio_readers_refuse_bad_files(case, tmp_path):
  make, error, pattern = AUDIO_CASES[case]
  path = make(tmp_path)
  with pytest.raises(error, match=pattern):
    media.read_audio(path, 16000)


def test_good_audio_at_any_rate_and_layout_reads(tmp_path):
  """The other side of the table: what the readers accept is read right."""
  tone = _tone(sr=44100)
  scipy.io.wavfile.write(tmp_path / "s.wav", 44100, np.stack([tone, tone], 1))
  y = media.read_audio(tmp_path / "s.wav", 16000)
  assert y.shape == (8000,) and np.all(np.isfinite(y))
  np.testing.assert_allclose(np.abs(y[1000:-1000]).max(), 0.3, atol=0.01)
  media.write_mp4(tmp_path / "a.mp4", _frames(), 25, audio=_tone(0.4))
  assert abs(len(media.read_audio(tmp_path / "a.mp4", 16000)) - 6400) < 2048


def test_image_reader_refuses_bad_files(tmp_path):
  for make, pattern in ((_folder("face.png"), r"face\.png is a folder; expected an image file"),
                        (_write("e.png", b""), r"e\.png is empty"),
                        (_write("j.png", b"\x89PNG junk"), r"read_image: .*j\.png is not an image"),
                        (lambda d: _valid_wav(d / "v.wav"),
                         r"v\.wav is not an image .* no picture")):
    with pytest.raises(ValueError, match=pattern):
      media.read_image(make(tmp_path))


def test_non_utf8_file_names_read_and_errors_stay_printable(tmp_path):
  good = str(tmp_path / (NON_UTF8 + ".wav"))
  _valid_wav(good)
  np.testing.assert_allclose(media.read_audio(good, 16000), _tone(), atol=1 / 32767)
  bad = str(tmp_path / (NON_UTF8 + "_empty.wav"))
  open(bad, "wb").close()
  with pytest.raises(ValueError) as e:
    media.read_audio(bad)
  msg = str(e.value)
  msg.encode("utf-8")    # printable on any UTF-8 terminal/log (raw surrogates would raise)
  assert "clip_\\udcff\\udcfe_empty.wav is empty" in msg


# ------------------------------------------------------------------------------- DualTalk layout
def _speaker(folder, name, k, t=30, sr=16000, exp=None, pose=None, audio_s=None):
  rng = np.random.default_rng(k)
  exp = rng.standard_normal((t, 50)).astype(np.float32) if exp is None else exp
  pose = 0.1 * rng.standard_normal((t, 6)).astype(np.float32) if pose is None else pose
  np.savez(os.path.join(folder, f"{name}_speaker{k}.npz"), exp=exp, pose=pose)
  seconds = t / 25 if audio_s is None else audio_s
  media.write_wav(os.path.join(folder, f"{name}_speaker{k}.wav"), _tone(seconds, sr), sr)


def _conversation(folder, name="c", **kw):
  os.makedirs(folder, exist_ok=True)
  for k in (1, 2):
    _speaker(str(folder), name, k, **kw)
  return str(folder)


def test_dualtalk_conversation_errors_name_the_file(tmp_path):
  d = _conversation(tmp_path / "ok")
  flame, audio = dualtalk.load_conversation(d, "c")
  assert [f.shape for f in flame] == [(30, 56)] * 2 and [len(a) for a in audio] == [19200] * 2

  def broken(name, edit):
    folder = _conversation(tmp_path / name)
    edit(folder)
    return folder

  cases = [
      ("unpaired_speaker2",
       lambda f: (os.remove(f"{f}/c_speaker1.npz"), os.remove(f"{f}/c_speaker1.wav")),
       FileNotFoundError, r"c_speaker2.npz has no partner c_speaker1.npz"),
      ("truncated_npz", lambda f: _cut(f"{f}/c_speaker1.npz", 0.6), ValueError,
       r"c_speaker1.npz: (not a readable npz file|key 'exp' does not read back)"),
      ("empty_npz", lambda f: open(f"{f}/c_speaker2.npz", "w").close(), ValueError,
       r"c_speaker2.npz is empty \(0 bytes\)"),
      ("zero_frames",
       lambda f: np.savez(f"{f}/c_speaker1.npz", exp=np.zeros((0, 50)), pose=np.zeros((0, 6))),
       ValueError, r"c_speaker1.npz: key 'exp' has 0 frames"),
      ("inf_pose",
       lambda f: np.savez(f"{f}/c_speaker2.npz", exp=np.zeros((30, 50)),
                          pose=np.where(np.arange(30)[:, None] == 4, np.inf, np.zeros((30, 6)))),
       ValueError, r"c_speaker2.npz: key 'pose' has non-finite values \(first at frame 4"),
      ("single_array_npy", lambda f: _npy_as_npz(f"{f}/c_speaker1.npz"), ValueError,
       r"c_speaker1.npz: holds a single array"),
      ("folder_as_npz",
       lambda f: (os.remove(f"{f}/c_speaker2.npz"), os.mkdir(f"{f}/c_speaker2.npz")),
       ValueError, r"c_speaker2.npz is a folder; expected a DualTalk npz"),
      ("truncated_wav", lambda f: _cut(f"{f}/c_speaker2.wav", 0.5), ValueError,
       r"c_speaker2.wav: truncated WAV file"),
      ("stereo_to_six_channels", lambda f: scipy.io.wavfile.write(f"{f}/c_speaker1.wav", 16000,
                                                                  np.zeros((19200, 6), np.int16)),
       ValueError, r"c_speaker1.wav: expected mono or stereo"),
      ("audio_shorter_than_motion", lambda f: _speaker(f, "c", 2, audio_s=0.5), ValueError,
       r"c_speaker2: motion lasts 1.20 s \(30 frames at 25 fps\) but audio 0.50 s"),
  ]
  for name, edit, error, pattern in cases:
    folder = broken(name, edit)
    with pytest.raises(error, match=pattern):
      dualtalk.load_conversation(folder, "c") if name != "unpaired_speaker2" else (
          dualtalk.conversations(folder))


def _cut(path, fraction):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * fraction)])


def _npy_as_npz(path):
  with open(path, "wb") as f:
    np.save(f, np.zeros((30, 56), np.float32))


def test_dualtalk_resamples_other_rates_and_lists_non_utf8_names(tmp_path):
  folder = str(tmp_path / "train")
  os.makedirs(folder)
  for k in (1, 2):
    _speaker(folder, NON_UTF8, k, sr=44100)
  assert dualtalk.conversations(folder) == [NON_UTF8]
  flame, audio = dualtalk.load_conversation(folder, NON_UTF8)
  assert [len(a) for a in audio] == [30 * 640] * 2   # 44.1 kHz -> 16 kHz, cropped to the motion
  np.testing.assert_allclose(np.abs(audio[0][2000:-2000]).max(), 0.3, atol=0.01)
  os.remove(os.path.join(folder, f"{NON_UTF8}_speaker2.wav"))
  with pytest.raises(FileNotFoundError) as e:
    dualtalk.load_conversation(folder, NON_UTF8)
  assert "clip_\\udcff\\udcfe_speaker2.wav" in str(e.value)
  str(e.value).encode("utf-8")


def test_dualtalk_build_stops_at_a_bad_conversation_or_skips_and_counts_it(tmp_path, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from avatar_jax.data.builders import build as build_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path / "DualTalk"
  for name in ("a", "b", "c"):
    _conversation(root / "train", name)
  _cut(root / "train" / "b_speaker2.wav", 0.5)                        # damaged
  _speaker(str(root / "train"), "orphan", 2)                           # unpaired
  with pytest.raises(FileNotFoundError, match=r"orphan_speaker2.npz has no partner"):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "strict"), manual_dir=str(root))
  os.remove(root / "train" / "orphan_speaker2.npz")
  os.remove(root / "train" / "orphan_speaker2.wav")
  with pytest.raises(ValueError, match=r"b_speaker2.wav: truncated WAV file"):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "strict2"), manual_dir=str(root))
  _speaker(str(root / "train"), "orphan", 2)
  with caplog.at_level(logging.WARNING):
    build_lib.build("dualtalk", data_dir=str(tmp_path / "lenient"), manual_dir=str(root),
                    skip_bad=True)
  records = tfds.data_source("dualtalk", split="train", data_dir=str(tmp_path / "lenient"))
  names = [r["name"].decode() if isinstance(r["name"], bytes) else r["name"] for r in records]
  assert names == ["a", "a", "c", "c"]
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert "Skipping: " in logged and "orphan_speaker2.npz has no partner" in logged
  assert re.search(r"Skipping conversation 'b' of .*b_speaker2.wav: truncated WAV file", logged)
  assert re.search(r"train: skipped 1 of 3 conversations \(skip_bad\): \['b'\]", logged)


@SETTINGS
@hypothesis.given(t=st.integers(0, 12), exp_w=st.sampled_from([49, 50, 51]),
                  pose_t=st.integers(-1, 1), bad=st.sampled_from([None, np.nan, np.inf, -np.inf]),
                  where=st.integers(0, 1000), dtype=st.sampled_from([np.float32, np.float64]))
def test_npz_loader_property(tmp_path, t, exp_w, pose_t, bad, where, dtype):
  """Any npz: either exactly DualTalk's 56-d vector of it, or an error naming the file."""
  rng = np.random.default_rng(where)
  exp = rng.standard_normal((t, exp_w)).astype(dtype)
  pose = rng.standard_normal((max(t + pose_t, 0), 6)).astype(dtype)
  if bad is not None and exp.size:
    exp.flat[where % exp.size] = bad
  path = str(tmp_path / f"p{where}_speaker1.npz")
  np.savez(path, exp=exp, pose=pose)
  valid = t > 0 and exp_w == 50 and pose_t == 0 and (bad is None or exp.size == 0)
  if valid:
    got = dualtalk.load_speaker_npz(path)
    np.testing.assert_array_equal(got, dualtalk.to_flame56(exp, pose))
    assert got.dtype == np.float32
  else:
    with pytest.raises((ValueError, KeyError), match=re.escape(os.path.basename(path))):
      dualtalk.load_speaker_npz(path)


@SETTINGS
@hypothesis.given(sr=st.sampled_from([1, 3999, 8000, 22050, 48000]),
                  channels=st.integers(1, 4), n=st.integers(0, 400),
                  dtype=st.sampled_from(["int16", "int32", "uint8", "float32"]),
                  nan_at=st.one_of(st.none(), st.integers(0, 399)),
                  cut=st.one_of(st.none(), st.integers(1, 200)))
def test_wav_reader_property(tmp_path, sr, channels, n, dtype, nan_at, cut):
  """Any WAV: either the exact samples (float32, mono, finite, header's count and rate) or an
  error naming the file."""
  rng = np.random.default_rng(n)
  x = rng.uniform(-0.9, 0.9, (n, channels))
  pcm = {"int16": lambda: np.round(x * 32767).astype(np.int16),
         "int32": lambda: np.round(x * 2**31 * 0.999).astype(np.int32),
         "uint8": lambda: np.round(x * 127 + 128).astype(np.uint8),
         "float32": lambda: x.astype(np.float32)}[dtype]()
  finite = True
  if nan_at is not None and dtype == "float32" and n:
    pcm[nan_at % n, 0] = np.nan
    finite = False
  path = tmp_path / f"w{sr}_{channels}_{n}_{dtype}.wav"
  scipy.io.wavfile.write(path, sr, pcm[:, 0] if channels == 1 else pcm)
  size = os.path.getsize(path)
  if cut is not None and cut < size - 44:
    _cut(path, (size - cut) / size)
  truncated = os.path.getsize(path) < size
  valid = sr >= 4000 and channels <= 2 and n > 0 and finite and not truncated
  if valid:
    audio, rate = media.read_wav(path)
    assert rate == sr and audio.dtype == np.float32 and audio.shape == (n,)
    assert np.all(np.isfinite(audio)) and np.all(np.abs(audio) <= 1)
    # 8-bit PCM holds 1/128 steps (written here with a 127 scale): up to ~0.011 off.
    np.testing.assert_allclose(audio, x.mean(1), atol=2 / 128 if dtype == "uint8" else 2e-3)
  else:
    with pytest.raises(ValueError, match=re.escape(path.name)):
      media.read_wav(path)


# ------------------------------------------------------------------------------- arrays source
def _arrays_config(root):
  c = ml_collections.ConfigDict()
  c.data = pipeline.default_config()
  d = c.data
  d.synthdyad.render = False
  d.synthdyad.duration_s = 1.0
  d.split_sizes.train, d.split_sizes.test, d.split_sizes.ood = 2, 2, 2
  d.clip_frames, d.batch_size = 10, 2
  d.features.n_mels = 16
  a = d.copy_and_resolve_references()
  a.source, a.arrays.dir = "arrays", str(root)
  return c, a


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_arrays") / "enc"
  c, _ = _arrays_config(root)
  encoding.encode(c, str(root), "mel", splits=("train",), shard_size=2, progress=False)
  return root


def test_arrays_source_refuses_damaged_directories(encoded, tmp_path):
  def copy(name):
    root = tmp_path / name
    shutil.copytree(encoded, root)
    return root

  good = arrays.ArraysSource(str(encoded), "train")
  assert len(good) == 2 and np.all(np.isfinite(good[0]["mel_self"]))

  root = copy("meta_cut")
  _cut(root / "metadata.json", 0.5)
  with pytest.raises(ValueError, match=r"meta_cut/metadata.json: not valid JSON .* expected the "
                     r"metadata written by `python -m avatar_jax.encode`"):
    arrays.ArraysSource(str(root), "train")
  root = copy("meta_dir")
  os.remove(root / "metadata.json")
  os.mkdir(root / "metadata.json")
  with pytest.raises(ValueError, match=r"meta_dir/metadata.json is a folder"):
    arrays.ArraysSource(str(root), "train")
  root = copy("meta_fields")
  meta = json.load(open(root / "metadata.json"))
  del meta["splits"]
  json.dump(meta, open(root / "metadata.json", "w"))
  with pytest.raises(ValueError, match=r"meta_fields/metadata.json: has no 'splits'"):
    arrays.ArraysSource(str(root), "train")
  root = copy("marker")
  (root / "train" / "shard-00000.json").write_text('{"num_frames": 3')
  with pytest.raises(ValueError, match=r"train/shard-00000.json: not valid JSON"):
    arrays.ArraysSource(str(root), "train")
  root = copy("no_shard")
  os.remove(root / "train" / "shard-00000.array_record")
  with pytest.raises(FileNotFoundError,
                     match=r"shard-00000.array_record is missing but its marker"):
    arrays.ArraysSource(str(root), "train")
  root = copy("shard_cut")
  _cut(root / "train" / "shard-00000.array_record", 0.5)
  source = arrays.ArraysSource(str(root), "train")
  with pytest.raises(ValueError, match=r"example 0 does not read back .* from .*shard_cut/train/"
                     r"shard-00000.array_record; the shard is damaged"):
    source[0]


def test_pack_refuses_non_finite_values():
  with pytest.raises(ValueError, match=r"split 'train' example 3: key 'mel_self' has 1 "
                     r"non-finite values \(first at index \[2, 1\]\)"):
    arrays.pack({"mel_self": np.where(np.arange(12).reshape(4, 3) == 7, np.nan, 0.0),
                 "num_frames": np.int32(4)}, "split 'train' example 3")


@SETTINGS
@hypothesis.given(shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4),
                  dtype=st.sampled_from(["float32", "int32", "uint8", "bool", "float16"]),
                  cut=st.integers(1, 64))
def test_records_round_trip_or_fail_loudly(shapes, dtype, cut):
  rng = np.random.default_rng(len(shapes))
  rec = {f"k{i}": (rng.standard_normal(s) * 10).astype(dtype) for i, s in enumerate(shapes)}
  data = arrays.pack(rec)
  got = arrays.unpack(data)
  assert sorted(got) == sorted(rec)
  for k, v in rec.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(got[k], v)
  # A record cut short never decodes into arrays of the declared shapes.
  payload = sum(v.nbytes for v in rec.values())
  if payload and cut <= payload:
    with pytest.raises(ValueError):
      arrays.unpack(data[:len(data) - cut - (len(data) - _end(data))])


def _end(record):
  """Byte just after the last array of a record."""
  import struct  # pylint: disable=g-import-not-at-top
  (n,) = struct.unpack_from("<Q", record, 0)
  header = json.loads(record[8:8 + n])
  start = -(-(8 + n) // 64) * 64
  return max(start + off + int(np.prod(shape)) * np.dtype(dt).itemsize
             for dt, shape, off in header.values())


# ------------------------------------------------------------------------------- config parser
DEFAULTS = dict(steps=800, lr=1e-3, attn="gaussian", learn_sigma=True, w2v="")


@SETTINGS
@hypothesis.given(items=st.lists(st.tuples(
    st.sampled_from(sorted(DEFAULTS) + ["stpes", "width2", "Steps"]),
    st.one_of(st.none(), st.integers(-5, 5000).map(str), st.floats(1e-6, 10).map(repr),
              st.sampled_from(["true", "False", "0", "yes", "", "abc", "1.5", "nan"]))),
    max_size=4))
def test_config_argument_parser_property(items):
  """Any `key=value,...`: the values typed like the defaults, or an error naming the key."""
  arg = ",".join(k if v is None else f"{k}={v}" for k, v in items)
  # The parser's contract, item by item: the first bad item is the error.
  expected, error, seen = dict(DEFAULTS), None, set()
  for k, v in items:
    if k not in DEFAULTS:
      error = (KeyError, k)
      break
    if k in seen:
      error = (ValueError, k)
      break
    seen.add(k)
    default = DEFAULTS[k]
    try:
      if v is None:
        if not isinstance(default, bool):
          raise ValueError
        expected[k] = True
      elif isinstance(default, bool):
        if v.lower() not in ("true", "false", "1", "0"):
          raise ValueError
        expected[k] = v.lower() in ("true", "1")
      else:
        expected[k] = type(default)(v)
    except ValueError:
      error = (ValueError, k)
      break
  if error is None:
    got = config_lib.parse_arg(arg, **DEFAULTS)
    for k, v in expected.items():
      assert got[k] == v or (v != v and got[k] != got[k]), (arg, k)
      assert type(got[k]) is type(DEFAULTS[k]), (arg, k)
  else:
    with pytest.raises(error[0], match=re.escape(repr(error[1])) + "|" + re.escape(error[1] + "=")):
      config_lib.parse_arg(arg, **DEFAULTS)


@SETTINGS
@hypothesis.given(key=st.sampled_from(["train.num_step", "optim.lrr", "data.batchsize", "model.x"]),
                  value=st.one_of(st.integers(), st.text(max_size=5)))
def test_locked_config_rejects_unknown_keys_property(key, value):
  config = harness.load_quickstart()
  node, *parents = config, *key.split(".")[:-1]
  for p in parents:
    node = node[p]
  with pytest.raises((AttributeError, KeyError), match=key.split(".")[-1]):
    node[key.split(".")[-1]] = value
  with pytest.raises(TypeError):
    config.train.num_steps = "many"   # a typed field keeps its type


# ------------------------------------------------------------------------------- entry points
def test_sample_and_encode_refuse_a_folder_before_loading_anything(tmp_path):
  (tmp_path / "voice").mkdir()
  _valid_wav(tmp_path / "partner.wav")
  env = harness.subprocess_env(str(tmp_path / "cache"))
  out = subprocess.run(
      [sys.executable, "-m", "avatar_jax.sample", f"--workdir={tmp_path / 'none'}",
       f"--self-audio={tmp_path / 'voice'}", f"--partner-audio={tmp_path / 'partner.wav'}"],
      cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  want = "voice is a folder; expected an audio file for --self-audio"
  assert want in out.stderr, out.stderr[-2000:]
  (tmp_path / "out.txt").write_text("x")
  out = subprocess.run(
      [sys.executable, "-m", "avatar_jax.encode", f"--config={harness.QUICKSTART}",
       f"--out={tmp_path / 'out.txt'}"],
      cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "out.txt is a file; expected a directory" in out.stderr, out.stderr[-2000:]
