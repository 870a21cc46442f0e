"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The benchmark scripts (benchmarks/, run as `python -m benchmarks.x` from the repository root) are
# not part of the installed package; tests that drive them import them from the checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _fast_compile_everywhere():
  """Every program compiled in the test processes skips LLVM's optimisation (subprocesses get the
  same through trainer_harness.subprocess_env): at the tests' sizes compiling is most of the time,
  and the whole suite ran 930 -> 866 s on 2 cores with every test passing either way."""
  import trainer_harness  # pylint: disable=g-import-not-at-top
  with trainer_harness.fast_compile():
    yield
