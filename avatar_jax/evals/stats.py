"""Summary statistics over seeds: mean with a Student-t confidence interval."""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import stats as sp_stats


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
  """(mean, half-width) of the two-sided `confidence` interval of the mean, t-distribution.

  half-width = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), s the sample std (ddof = 1).
  NaN values are dropped; one value gives (value, NaN), none gives (NaN, NaN).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), found {confidence}")
  x = np.asarray([float(v) for v in values], np.float64)
  x = x[~np.isnan(x)]
  if x.size == 0:
    return math.nan, math.nan
  if x.size == 1:
    return float(x[0]), math.nan
  t = sp_stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)
  return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(x.size))
