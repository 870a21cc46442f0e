"""Compatibility shims for tensorflow-datasets without TensorFlow."""

import importlib
import importlib.resources.abc
import sys

try:
  importlib.import_module("importlib_resources")
except ImportError:
  # tensorflow-datasets 4.9.x imports the `importlib_resources` backport when it locates a
  # builder's source file, although it only declares it for Python < 3.9. On 3.9+ the standard
  # library module has the same API, so let it stand in rather than add a dependency.
  sys.modules["importlib_resources"] = importlib.resources
