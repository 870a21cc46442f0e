"""SynthDyad renderer: a 2D face per frame from motion coefficients and an identity.

Vectorised over all frames at once: every part is a signed distance field (in image units) on a
[T, H, W] grid, turned into anti-aliased coverage by a one-pixel linear ramp, and the layers are
composited back-to-front by converting coverages into per-layer weights and one matmul with the
layer colours. Image coordinates run over [-1, 1] on both axes (y down), so geometry does not
depend on the resolution.

Geometry (head units: the head ellipse has half-height 1, half-width face_aspect):
  head      centre moved by yaw (x) and pitch (y), rotated by roll, half-width foreshortened by
            cos(yaw); the face features shift with sin(yaw) / sin(pitch) and compress with the cosine
  hair      cap over the top of the head, hairline curved
  eyes      whites + pupils moved by gaze; upper lids close with blink
  brows     capsules lifted by brow_raise, thickness from the identity
  mouth     lips ellipse + dark interior; height from jaw_open, width/height from lip_round,
            centre line bent upward at the corners and widened by smile
"""
from __future__ import annotations

import numpy as np

from avatar_jax.data.synthdyad import identity as identity_lib
from avatar_jax.data.synthdyad import motion as motion_lib

HEAD_HALF_HEIGHT = 0.70  # image units (image spans [-1, 1])
HEAD_CENTRE_Y = 0.06
HEAD_SHIFT = 0.25  # image units of head-centre shift per radian of yaw / pitch
FEATURE_SHIFT = 1.2  # head units of feature shift per radian of yaw / pitch
EYE_Y, EYE_RX, EYE_RY, PUPIL_R = -0.12, 0.14, 0.085, 0.055
GAZE_RANGE = (0.08, 0.05)  # pupil offset (head units) at gaze = 1
BROW_Y, BROW_LIFT, BROW_HALF_LEN = -0.30, 0.12, 0.15
MOUTH_Y, LIP_THICK, JAW_OPEN_H, SMILE_BEND, SMILE_WIDEN = 0.47, 0.045, 0.17, 0.12, 0.15
HAIRLINE = -0.60
CHUNK_FRAMES = 16  # frames per vectorised block at 64x64 (scaled by area): arrays stay in cache
_C = motion_lib.CHANNEL_INDEX


def _ellipse_sdf(u, v, rx, ry):
  """Approximate signed distance to an axis-aligned ellipse: first-order (f - 1) / |grad f|."""
  qx, qy = u / rx, v / ry
  f = np.sqrt(qx * qx + qy * qy)
  g = np.sqrt((qx / rx) ** 2 + (qy / ry) ** 2)
  return (f - 1.0) * f / np.maximum(g, 1e-6)


def _capsule_sdf(u, v, half_len, radius):
  """Signed distance to a horizontal capsule centred at the origin."""
  du = np.maximum(np.abs(u) - half_len, 0.0)
  return np.sqrt(du * du + v * v) - radius


def _col(x, n):
  """Per-frame parameter [n] -> [n, 1, 1] for broadcasting against the pixel grid."""
  return np.asarray(x, np.float32).reshape(n, 1, 1)


def _render_block(m: np.ndarray, ident: identity_lib.Identity, res: int, colours: np.ndarray,
                  boxes: bool = True):
  """Frames m [n, C] -> float32 planar RGB [3, n, res, res] in [0, 1].

  boxes=False evaluates every part on the whole image (slow; the tests' reference that the
  per-part bounding boxes never cut a part).
  """
  n = m.shape[0]
  axis = ((np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0)
  px = 2.0 / res  # one pixel in image units
  scale = np.float32(HEAD_HALF_HEIGHT / px)  # head units -> pixels

  def col(name):
    return _col(m[:, _C[name]], n)

  yaw, pitch, roll = col("head_yaw"), col("head_pitch"), col("head_roll")
  cx = HEAD_SHIFT * np.sin(yaw)
  cy = HEAD_CENTRE_Y - HEAD_SHIFT * np.sin(pitch)
  cr, sr = np.cos(roll), np.sin(roll)
  a = np.float32(ident.face_aspect)
  cyaw, cpitch = np.cos(yaw), np.cos(pitch)
  su, sv = FEATURE_SHIFT * a * np.sin(yaw), -FEATURE_SHIFT * np.sin(pitch)

  def head_coords(rows, cols):
    """Head-frame coordinates (u, v) [n, h, w] of the pixels rows x cols."""
    dx, dy = axis[None, None, cols] - cx, axis[None, rows, None] - cy
    k = np.float32(1.0 / HEAD_HALF_HEIGHT)
    return (dx * cr + dy * sr) * k, (dy * cr - dx * sr) * k

  def feature_coords(rows, cols):
    u, v = head_coords(rows, cols)
    return (u - su) / cyaw, (v - sv) / cpitch

  def box(fu_range, fv_range):
    """Pixel slices covering the feature-frame rectangle in every frame of the block."""
    fu = np.array([fu_range[0], fu_range[1], fu_range[0], fu_range[1]], np.float32)
    fv = np.array([fv_range[0], fv_range[0], fv_range[1], fv_range[1]], np.float32)
    u, v = fu * cyaw[:, 0] + su[:, 0], fv * cpitch[:, 0] + sv[:, 0]
    x = cx[:, 0] + (u * cr[:, 0] - v * sr[:, 0]) * HEAD_HALF_HEIGHT
    y = cy[:, 0] + (u * sr[:, 0] + v * cr[:, 0]) * HEAD_HALF_HEIGHT

    if not boxes:
      return slice(0, res), slice(0, res)

    def span(z):
      lo = int(np.floor((z.min() + 1.0) / px - 0.5)) - 2
      hi = int(np.ceil((z.max() + 1.0) / px - 0.5)) + 3
      return slice(min(max(lo, 0), res), min(max(hi, 0), res))
    return span(y), span(x)

  def cover(d):
    c = 0.5 - d * scale
    np.clip(c, 0.0, 1.0, out=c)
    return c

  def over(img, c, colour):
    """img [3, n, h, w] <- c * colour + (1 - c) * img, in place (planar: long inner loops)."""
    for ch in range(3):
      img[ch] += c * (colour[ch] - img[ch])

  # Background, head, hair over the head's bounding box.
  img = np.empty((3, n, res, res), np.float32)
  img[...] = colours[0][:, None, None, None]
  rows, cols = box((-1.1 * a - 0.1, 1.1 * a + 0.1), (-1.2, 1.2))
  u, v = head_coords(rows, cols)
  sub = img[:, :, rows, cols]
  over(sub, cover(_ellipse_sdf(u, v, a * cyaw, 1.0)), colours[1])
  hairline = v - (HAIRLINE + 0.25 * (u / a) ** 2)
  over(sub, cover(np.maximum(_ellipse_sdf(u, v + 0.02, 1.06 * a * cyaw, 1.06), hairline)),
       colours[2])

  # Eyes and brows (both sides at once through |fu|).
  ex = np.float32(ident.eye_spacing) * a
  half_w = ex + max(EYE_RX, BROW_HALF_LEN + 0.5 * ident.brow_thickness) + 0.05
  rows, cols = box((-half_w, half_w),
                   (BROW_Y - BROW_LIFT - 0.5 * ident.brow_thickness - 0.1, EYE_Y + EYE_RY + 0.05))
  fu, fv = feature_coords(rows, cols)
  sub = img[:, :, rows, cols]
  eu = np.abs(fu) - ex
  ev = fv - EYE_Y
  white = cover(_ellipse_sdf(eu, ev, EYE_RX, EYE_RY))
  over(sub, white, colours[3])
  gx, gy = col("gaze_x"), col("gaze_y")
  pupil = cover(np.sqrt((eu - np.sign(fu) * GAZE_RANGE[0] * gx) ** 2
                        + (ev - GAZE_RANGE[1] * gy) ** 2) - PUPIL_R)
  over(sub, pupil * white, colours[4])
  lid_edge = EYE_RY * (2.3 * col("blink") - 1.2)  # above the eye at blink = 0, below at 1
  over(sub, np.minimum(white, cover(ev - lid_edge)), colours[5])
  bv = fv - (BROW_Y - BROW_LIFT * col("brow_raise"))
  brow = cover(_capsule_sdf(eu, bv - 0.03 * (eu / BROW_HALF_LEN) ** 2, BROW_HALF_LEN,
                            0.5 * ident.brow_thickness))
  over(sub, brow, colours[6])

  # Mouth.
  jaw, rnd, smile = col("jaw_open"), col("lip_round"), col("smile")
  w = ident.mouth_width * a * (1.0 - 0.35 * np.maximum(rnd, 0) + 0.12 * np.maximum(-rnd, 0)
                                + SMILE_WIDEN * smile)
  h = 0.012 + JAW_OPEN_H * jaw + 0.03 * np.maximum(rnd, 0)
  mw = ident.mouth_width * a * (1.12 + SMILE_WIDEN) + 0.1
  rows, cols = box((-mw, mw), (MOUTH_Y - SMILE_BEND - 0.35, MOUTH_Y + 1.5 * JAW_OPEN_H + 0.15))
  fu, fv = feature_coords(rows, cols)
  sub = img[:, :, rows, cols]
  mv = fv - (MOUTH_Y + 0.5 * JAW_OPEN_H * jaw) + SMILE_BEND * smile * (fu / w) ** 2
  over(sub, cover(_ellipse_sdf(fu, mv, w + 0.02, h + LIP_THICK)), colours[7])
  over(sub, cover(_ellipse_sdf(fu, mv, 0.9 * w, h)), colours[8])
  return img


def _colours(ident: identity_lib.Identity) -> np.ndarray:
  skin, hair = np.array(ident.skin_rgb), np.array(ident.hair_rgb)
  return np.stack([
      np.array(ident.background_rgb),  # background
      skin,  # head
      hair,  # hair
      np.array([0.95, 0.95, 0.93]),  # eye whites
      np.array([0.07, 0.05, 0.05]),  # pupils
      skin * 0.92,  # eyelids
      hair * 0.7,  # brows
      np.clip(skin * np.array([0.95, 0.55, 0.55]), 0, 1),  # lips
      np.array([0.25, 0.05, 0.07]),  # mouth interior
  ]).astype(np.float32)


def render(motion: np.ndarray, identity: identity_lib.Identity, resolution: int = 64) -> np.ndarray:
  """Renders motion [T, C] (C >= len(MOTION_CHANNELS)) of `identity`: uint8 [T, H, W, 3], H = W."""
  motion = np.asarray(motion, np.float32)
  if motion.ndim != 2 or motion.shape[1] < len(motion_lib.MOTION_CHANNELS):
    raise ValueError(f"render expects motion [T, {len(motion_lib.MOTION_CHANNELS)}] "
                     f"(channels {motion_lib.MOTION_CHANNELS}), found shape {motion.shape}.")
  if int(resolution) != resolution or resolution < 16:
    raise ValueError(f"render resolution must be an integer >= 16, found {resolution!r}.")
  res = int(resolution)
  colours = _colours(identity)
  out = np.empty((motion.shape[0], res, res, 3), np.uint8)
  chunk = max(1, CHUNK_FRAMES * 64 * 64 // (res * res))
  for s in range(0, motion.shape[0], chunk):
    img = _render_block(motion[s:s + chunk], identity, res, colours)
    out[s:s + chunk] = np.moveaxis(np.clip(img * 255.0 + 0.5, 0.0, 255.0), 0, -1)
  return out


def neutral_motion(num_frames: int = 1) -> np.ndarray:
  """All-zero coefficients: closed mouth, open eyes, straight gaze and head. [T, C] float32."""
  return np.zeros((num_frames, len(motion_lib.MOTION_CHANNELS)), np.float32)


def reference_image(identity: identity_lib.Identity, resolution: int = 64) -> np.ndarray:
  """The neutral frame of `identity`: uint8 [H, W, 3]."""
  return render(neutral_motion(1), identity, resolution)[0]
