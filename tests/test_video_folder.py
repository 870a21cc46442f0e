"""The video_folder TFDS builder on talking videos the test writes with real codecs."""
import dataclasses
import os
import shutil

import av
import numpy as np
import pytest
import tensorflow_datasets as tfds

from avatar_jax.data import media, pipeline
from avatar_jax.data.builders import build as build_lib
from avatar_jax.data.builders.video_folder import video_folder_dataset_builder as vf
from avatar_jax.data.synthdyad import generator as sd

R = 64        # rendered face size = crop size: the centre crop needs no resize
BAR = 16      # coloured bars left and right of the face, which a centre crop must drop
TONES = {("a_conv", "alice"): 330.0, ("a_conv", "bob"): 520.0,
         ("b_conv", "carol"): 410.0, ("b_conv", "dave"): 610.0}


def _faces(fps):
  """Both sides of a 2 s SynthDyad conversation rendered at `fps`: two uint8 [T, R, R, 3]."""
  cfg = dataclasses.replace(sd.regime_for("train"), duration_s=2.0, resolution=R, fps=fps)
  s = sd.make_sample("train", 0, seed=3, config=cfg, render=True)
  return s["video"], s["partner_video"]


def _marker(i):
  """Grey level of the 8x8 patch in the face's top-left corner of source frame i: tells which
  source frame (mod 21) an output frame came from; 10 levels apart, beyond codec error (<= 5)."""
  return 20 + 10 * (np.asarray(i) % 21)


def _framed(faces):
  """[T, R, R + 2 * BAR, 3]: red bar | face with frame marker | blue bar (a wide shot framed on
  the face). Marks `faces` in place."""
  t = len(faces)
  faces[:, :8, :8] = _marker(np.arange(t))[:, None, None, None]
  red = np.broadcast_to(np.array([220, 30, 30], np.uint8), (t, R, BAR, 3))
  blue = np.broadcast_to(np.array([30, 30, 220], np.uint8), (t, R, BAR, 3))
  return np.concatenate([red, faces, blue], axis=2)


def _tone(freq, rate, seconds=2.0):
  t = np.arange(int(rate * seconds)) / rate
  return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(audio, rate=16000):
  spectrum = np.abs(np.fft.rfft(audio))
  return np.argmax(spectrum) * rate / len(audio)


@pytest.fixture(scope="module")
def talks(tmp_path_factory):
  """train/a_conv: 30 fps mp4s with 44.1 kHz stereo AAC; train/b_conv: 25 fps silent mp4s with
  48 kHz wavs beside them. Returns (root, {(conv, speaker): source frames}, {...: fps})."""
  root = tmp_path_factory.mktemp("talks")
  frames, fps_of = {}, {}
  for conv, fps, speakers in (("a_conv", 30, ("alice", "bob")), ("b_conv", 25, ("carol", "dave"))):
    os.makedirs(root / "train" / conv)
    for spk, faces in zip(speakers, _faces(fps)):
      video = _framed(faces)  # marks `faces` too: they are the expected crops
      frames[(conv, spk)], fps_of[(conv, spk)] = faces, fps
      tone = _tone(TONES[(conv, spk)], 44100 if fps == 30 else 48000)
      path = root / "train" / conv / f"{spk}.mp4"
      if fps == 30:  # stereo with unequal channels: the builder must average them
        media.write_mp4(path, video, fps, np.stack([tone, 0.5 * tone], axis=1), 44100)
      else:
        media.write_mp4(path, video, fps)
        media.write_wav(root / "train" / conv / f"{spk}.wav", tone, 48000)
  return root, frames, fps_of


@pytest.fixture(scope="module")
def built(talks, tmp_path_factory):
  root, _, _ = talks
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  build_lib.build("video_folder/r64", data_dir=data_dir, manual_dir=str(root))
  return data_dir


def _text(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def test_builds_pairs_at_25_fps_16_khz_with_centre_crops(talks, built):
  root, frames, fps_of = talks
  source = tfds.data_source("video_folder/r64", split="train", data_dir=built)
  assert len(source) == 4
  pairs = {"a_conv": ("alice", "bob"), "b_conv": ("carol", "dave")}
  for n, (conv, speakers) in enumerate(sorted(pairs.items())):
    for me in (0, 1):
      rec = source[2 * n + me]
      me_name, other = speakers[me], speakers[1 - me]
      assert (_text(rec["name"]), _text(rec["speaker_self"]), _text(rec["speaker_partner"]),
              int(rec["self_speaker"])) == (conv, me_name, other, me + 1)
      assert rec["fps"] == 25 and rec["sample_rate"] == 16000
      t = len(rec["video"])
      # 2 s resample to 50 +- 1 frames; clips are cut to whole Wan VAE latent frames (4).
      decoded = vf.read_video(str(root / "train" / conv / f"{me_name}.mp4"), R)
      assert abs(len(decoded) - 50) <= 1 and t == len(decoded) // 4 * 4
      assert rec["video"].shape[1:] == (R, R, 3) and rec["num_frames"] == t
      assert rec["partner_video"].shape == rec["video"].shape
      assert len(rec["audio_self"]) == len(rec["audio_partner"]) == t * 640
      np.testing.assert_array_equal(rec["reference_image"], rec["video"][0])
      # Frame k is the source frame nearest k / 25 s, cropped to the face (no bar colour).
      for key, spk in (("video", me_name), ("partner_video", other)):
        src = frames[(conv, spk)]
        idx = np.minimum(np.round(np.arange(t) * fps_of[(conv, spk)] / 25).astype(int),
                         len(src) - 1)
        seen = rec[key][:, :8, :8].reshape(t, -1).mean(1)
        got = np.abs(seen[:, None] - _marker(np.arange(21))[None]).argmin(1)
        np.testing.assert_array_equal(got, idx % 21)
        err = np.abs(rec[key].astype(np.float32) - src[idx]).mean()
        wrong = frames[(conv, other if spk == me_name else me_name)][idx]
        # H.264 at crf 18 leaves ~3.5 grey levels; a crop one pixel off gives ~5.4.
        assert err < 4.5, (conv, key, err)
        assert np.abs(rec[key].astype(np.float32) - wrong).mean() > 30  # the other speaker
      # Each audio track is its own speaker's tone, downmixed to mono and at 16 kHz.
      for key, spk in (("audio_self", me_name), ("audio_partner", other)):
        a = rec[key]
        assert abs(_peak_hz(a) - TONES[(conv, spk)]) < 2.0
        gain = 0.75 if conv == "a_conv" else 1.0  # (L + 0.5 L) / 2 for the stereo mp4s
        rms = np.sqrt(np.mean(a[1600:-1600] ** 2))
        assert abs(rms - gain * 0.4 / np.sqrt(2)) < 0.03, (conv, key, rms)
      if conv == "b_conv":  # wavs are read as the dualtalk builder reads them
        want = media.read_audio(root / "train" / conv / f"{me_name}.wav", 16000)
        np.testing.assert_array_equal(rec["audio_self"], want[: t * 640])


def test_pipeline_reads_video_windows(built):
  c = pipeline.default_config()
  c.source, c.tfds.name, c.tfds.data_dir = "tfds", "video_folder/r64", built
  c.clip_frames, c.batch_size, c.eval_windows = 16, 2, "tile"
  batch = next(pipeline.make(c, "train", keys=("video", "partner_video", "reference_image",
                                                 "mel_self"),
                             shuffle=False, num_epochs=1, shard_index=0, shard_count=1))
  assert batch["video"].shape == (2, 16, R, R, 3) and batch["video"].dtype == np.uint8
  assert batch["reference_image"].shape == (2, R, R, 3)
  assert batch["mel_self"].shape == (2, 32, 80)
  # Eval tiles: three 16-frame windows per 48-frame clip, laid out from the stored lengths.
  np.testing.assert_array_equal(batch["clip_start"], [0, 16])
  c.clip_frames, c.batch_size = 12, 64
  batch = next(pipeline.make(c, "train", keys=("audio_self",), shuffle=False, num_epochs=1,
                             shard_index=0, shard_count=1))
  np.testing.assert_array_equal(batch["example_index"], np.repeat(np.arange(4), 4))
  np.testing.assert_array_equal(batch["clip_start"], np.tile([0, 12, 24, 36], 4))


def test_box_crop_and_square():
  assert vf.square(64, 96) == (0, 16, 64)
  assert vf.square(64, 96, (70, 10, 20, 30)) == (10, 65, 30)  # grown to 30, centred on x=80
  assert vf.square(64, 96, (90, 50, 20, 20)) == (44, 76, 20)  # shifted back inside the frame


def test_box_crop_reads_the_box(talks, tmp_path):
  root, _, _ = talks
  path = root / "train" / "b_conv" / "carol.mp4"
  blue = vf.read_video(str(path), 8, box=(R + BAR, 16, BAR, BAR))  # inside the right bar
  assert blue.shape == (50, 8, 8, 3)
  np.testing.assert_allclose(blue.reshape(-1, 3).mean(0), [30, 30, 220], atol=6)
  (tmp_path / "x").mkdir()
  (tmp_path / "boxes.csv").write_text("video,x,y,w,h\nx/carol,80,16,16,16\n")
  assert vf.load_boxes(str(tmp_path)) == {"x/carol": (80.0, 16.0, 16.0, 16.0)}
  assert vf.box_key(str(tmp_path), str(tmp_path / "x" / "carol.mp4")) == "x/carol"
  (tmp_path / "boxes.csv").write_text("video,x,y\nx/carol,80,16\n")
  with pytest.raises(ValueError, match=r"boxes.csv: header .*expected"):
    vf.load_boxes(str(tmp_path))


def test_detect_crop_finds_a_real_face(tmp_path):
  """crop='detect' on a photograph (scikit-image's bundled astronaut, 512 px) placed at the left
  of a 512x1024 frame, where the centre crop would miss the face."""
  pytest.importorskip("cv2", reason="crop='detect' needs the [video] extra (OpenCV)")
  skimage_data = pytest.importorskip("skimage.data")
  frame = np.zeros((512, 1024, 3), np.uint8)
  frame[:, :512] = skimage_data.astronaut()
  path = tmp_path / "astronaut.mp4"
  media.write_mp4(path, np.stack([frame] * 5), 25)
  x, y, w, h = vf.detect_face(frame, "astronaut")
  # Her face (brows to chin) spans about x 180-270, y 70-160 (looked up on the image by eye).
  assert x < 180 and x + w > 270 and y < 70 and y + h > 160 and 100 < w < 250
  assert abs(w / vf.DETECT_MARGIN - 95) < 25     # the cascade's own box, before the margin
  top, left, side = vf.square(512, 1024, (x, y, w, h))
  got = vf.read_video(str(path), 64, detect=True)
  assert got.shape == (5, 64, 64, 3)
  centre = frame[:, 256:768]
  # The frames hold the face crop, not the (face-less) centre: both resized to 64 px to compare.
  face = frame[top:top + side, left:left + side]
  pool = lambda img: av.VideoFrame.from_ndarray(np.ascontiguousarray(img.astype(np.uint8)),
                                                format="rgb24").reformat(
      width=64, height=64, interpolation="AREA").to_ndarray(format="rgb24").astype(np.float32)
  err_face = np.abs(got[0].astype(np.float32) - pool(face)).mean()
  err_centre = np.abs(got[0].astype(np.float32) - pool(centre)).mean()
  assert err_face < 12 and err_centre > 3 * err_face, (err_face, err_centre)
  with pytest.raises(ValueError, match="finds no face in the first frame"):
    vf.detect_face(np.zeros((128, 128, 3), np.uint8), "blank.mp4")


def test_clear_errors(talks, tmp_path):
  root, _, _ = talks
  a = root / "train" / "a_conv" / "alice.mp4"
  # Unpaired: one speaker only.
  solo = tmp_path / "solo" / "train" / "c_conv"
  solo.mkdir(parents=True)
  shutil.copy(a, solo / "erin.mp4")
  (conv,) = vf.discover(str(tmp_path / "solo"))["train"]
  with pytest.raises(FileNotFoundError, match=r"c_conv.*1 speaker video.*erin.mp4.*exactly two"):
    vf.load_conversation(conv, R)
  # A silent mp4 and no wav.
  silent = tmp_path / "plain" / "silent"
  silent.mkdir(parents=True)
  shutil.copy(root / "train" / "b_conv" / "carol.mp4", silent / "carol.mp4")
  shutil.copy(a, silent / "bob.mp4")
  (conv,) = vf.discover(str(tmp_path / "plain"))["train"]  # no split folders: all is 'train'
  assert [(s.name, s.wav) for s in conv.speakers] == [("bob", None), ("carol", None)]
  with pytest.raises(ValueError, match=r"carol.mp4: has no audio stream.*carol.wav"):
    vf.load_conversation(conv, R)
  # A truncated mp4 (the index is written last, so half a file has none).
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
  with pytest.raises(ValueError, match=r"cut.mp4: .*truncated or damaged"):
    vf.read_video(str(cut), R)
  # A wav without its video.
  (tmp_path / "solo" / "train" / "c_conv" / "frank.wav").write_bytes(b"RIFF")
  with pytest.raises(FileNotFoundError, match=r"frank.wav has no video frank.mp4"):
    vf.discover(str(tmp_path / "solo"))


def test_skip_bad_leaves_out_unpaired(talks, tmp_path):
  root, _, _ = talks
  src = tmp_path / "talks"
  shutil.copytree(root / "train" / "b_conv", src / "b_conv")
  (src / "c_conv").mkdir()
  shutil.copy(root / "train" / "a_conv" / "alice.mp4", src / "c_conv" / "alice.mp4")
  with pytest.raises(FileNotFoundError, match=r"c_conv.*exactly two"):
    build_lib.build("video_folder/r64", data_dir=str(tmp_path / "strict"), manual_dir=str(src),
                    resolution=32, config_name="r32")
  build_lib.build("video_folder/r64", data_dir=str(tmp_path / "tfds"), manual_dir=str(src),
                  resolution=32, config_name="r32", skip_bad=True)
  source = tfds.data_source("video_folder/r32", split="train", data_dir=str(tmp_path / "tfds"))
  assert len(source) == 2 and {_text(source[i]["name"]) for i in range(2)} == {"b_conv"}
  assert source[0]["video"].shape[1:] == (32, 32, 3)


def test_seamless_layout_pairs_participants(talks, tmp_path):
  root, _, _ = talks
  a, b = root / "train" / "a_conv" / "alice.mp4", root / "train" / "a_conv" / "bob.mp4"
  # The per-archive layout: both participants' files side by side.
  flat = tmp_path / "improvised" / "dev" / "0000" / "0001"
  flat.mkdir(parents=True)
  shutil.copy(b, flat / "V00_S0001_I00000007_P0020.mp4")
  shutil.copy(a, flat / "V00_S0001_I00000007_P0003.mp4")
  (flat / "V00_S0001_I00000007_P0003.json").write_text("{}")
  # The full tree: video/ and audio/ folders.
  tree = tmp_path / "naturalistic" / "test"
  for sub in ("video", "audio"):
    (tree / sub).mkdir(parents=True)
  for p in ("P0100", "P0101"):
    for sub, ext in (("video", "mp4"), ("audio", "wav")):
      shutil.copy(root / "train" / "b_conv" / f"carol.{ext}",
                  tree / sub / f"V01_S0002_I00000009_{p}.{ext}")
  found = vf.discover(str(tmp_path), "seamless")
  assert sorted(found) == ["dev", "test"]
  (dev,) = found["dev"]
  assert dev.name == "V00_S0001_I00000007" and [s.name for s in dev.speakers] == ["P0003", "P0020"]
  assert dev.speakers[0].video.endswith("P0003.mp4") and dev.speakers[0].wav is None
  (test,) = found["test"]
  assert [os.path.relpath(s.wav, tree) for s in test.speakers] == [
      "audio/V01_S0002_I00000009_P0100.wav", "audio/V01_S0002_I00000009_P0101.wav"]
  videos, audios = vf.load_conversation(dev, 32)
  assert [len(v) for v in videos] == [50, 50] and [len(x) for x in audios] == [32000, 32000]
  videos, _ = vf.load_conversation(dev, 32, frame_multiple=7)
  assert [len(v) for v in videos] == [49, 49]
  assert abs(_peak_hz(audios[0]) - TONES[("a_conv", "alice")]) < 2.0  # P0003 is alice's file
