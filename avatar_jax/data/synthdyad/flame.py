"""The fixed linear map between SynthDyad motion and DualTalk's 56-d FLAME layout.

  exp  [0:50]  = EXP_BASIS @ (lip_round, smile, blink, brow_raise, gaze_x, gaze_y)
  jaw  [50:53] = (JAW_OPEN_RAD * jaw_open, 0, 0)        jaw rotation about the x axis (axis-angle)
  pose [53:56] = (head_pitch, head_yaw, head_roll)      radians

EXP_BASIS [50, 6] has orthonormal columns: the first six orthonormal DCT-II vectors of length 50,
EXP_BASIS[n, k] = s_k cos(pi (n + 1/2) k / 50), s_0 = sqrt(1/50), s_k = sqrt(2/50). Being
orthonormal, from_flame56 (EXP_BASIS.T @ exp) inverts the map exactly on its image and is the
least-squares read-back of any 50-d expression vector.
"""
from __future__ import annotations

import numpy as np

from avatar_jax.data.synthdyad import motion as motion_lib

FLAME_DIM = 56
EXP_SLICE, JAW_SLICE, POSE_SLICE = slice(0, 50), slice(50, 53), slice(53, 56)
EXPRESSION_CHANNELS = ("lip_round", "smile", "blink", "brow_raise", "gaze_x", "gaze_y")
POSE_CHANNELS = ("head_pitch", "head_yaw", "head_roll")
JAW_OPEN_RAD = 0.3  # jaw_open = 1 is a 0.3 rad (17°) jaw rotation


def _dct_basis(n: int, k: int) -> np.ndarray:
  rows = np.arange(n)[:, None] + 0.5
  cols = np.arange(k)[None, :]
  basis = np.cos(np.pi * rows * cols / n) * np.sqrt(2.0 / n)
  basis[:, 0] = np.sqrt(1.0 / n)
  return basis


EXP_BASIS = _dct_basis(50, len(EXPRESSION_CHANNELS))  # [50, 6], float64
_EXPR_IDX = [motion_lib.CHANNEL_INDEX[c] for c in EXPRESSION_CHANNELS]
_POSE_IDX = [motion_lib.CHANNEL_INDEX[c] for c in POSE_CHANNELS]
_JAW_IDX = motion_lib.CHANNEL_INDEX["jaw_open"]


def to_flame56(motion: np.ndarray) -> np.ndarray:
  """[..., C] SynthDyad motion -> [..., 56] float32 (exp 0:50, jaw 50:53, pose 53:56)."""
  motion = np.asarray(motion)
  if motion.shape[-1] < len(motion_lib.MOTION_CHANNELS):
    raise ValueError(f"to_flame56 expects motion [..., {len(motion_lib.MOTION_CHANNELS)}] "
                     f"(channels {motion_lib.MOTION_CHANNELS}), found shape {motion.shape}.")
  m = motion.astype(np.float64)
  out = np.zeros(m.shape[:-1] + (FLAME_DIM,))
  out[..., EXP_SLICE] = m[..., _EXPR_IDX] @ EXP_BASIS.T
  out[..., JAW_SLICE.start] = JAW_OPEN_RAD * m[..., _JAW_IDX]
  out[..., POSE_SLICE] = m[..., _POSE_IDX]
  return out.astype(np.float32)


def from_flame56(flame: np.ndarray) -> np.ndarray:
  """[..., 56] -> [..., C] float32 motion; exact inverse of to_flame56 for every channel."""
  flame = np.asarray(flame)
  if flame.shape[-1] != FLAME_DIM:
    raise ValueError(f"from_flame56 expects [..., {FLAME_DIM}] (DualTalk layout), "
                     f"found shape {flame.shape}.")
  f = flame.astype(np.float64)
  out = np.zeros(f.shape[:-1] + (len(motion_lib.MOTION_CHANNELS),))
  out[..., _EXPR_IDX] = f[..., EXP_SLICE] @ EXP_BASIS
  out[..., _JAW_IDX] = f[..., JAW_SLICE.start] / JAW_OPEN_RAD
  out[..., _POSE_IDX] = f[..., POSE_SLICE]
  return out.astype(np.float32)
