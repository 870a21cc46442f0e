"""Executes colab/quickstart.ipynb with a tiny setting (nbclient + ipykernel) and checks what it
shows: an embedded, decodable mp4 and the metrics table."""
from __future__ import annotations

import base64
import io
import json
import os
import re

import av
import nbclient
import nbformat

import trainer_harness as harness

NOTEBOOK = os.path.join(harness.REPO, "colab", "quickstart.ipynb")


def _outputs(cell, mime):
  return [o["data"][mime] for o in cell.get("outputs", []) if "data" in o and mime in o["data"]]


def test_quickstart_notebook_runs(tmp_path, tmp_path_factory, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
  workdir = tmp_path / "run"
  overrides = {**harness.OVERRIDES, "evals.test.at_end": True}
  env = harness.subprocess_env(harness.cache_dir(tmp_path_factory))
  for key in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "PYTHONPATH"):
    monkeypatch.setenv(key, env[key])
  monkeypatch.setenv("QUICKSTART_CONFIG_ARGS", harness.CONFIG_ARG)
  monkeypatch.setenv("QUICKSTART_OVERRIDES", json.dumps(overrides))
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(workdir))
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()   # raises CellExecutionError (with the traceback) if any cell fails

  # The install cell found the checkout and did not reinstall.
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "avatar_jax from" in text
  assert f"step {harness.NUM_STEPS}: lip_corr=" in text and "Resumed" not in text

  # The video is embedded (base64) and is a real mp4 with video and audio.
  videos = [h for c in nb.cells for h in _outputs(c, "text/html") if "<video" in h]
  assert len(videos) == 1
  match = re.search(r'src="data:video/mp4;base64,([A-Za-z0-9+/=\s]+)"', videos[0])
  assert match, videos[0][:300]
  data = base64.b64decode(match.group(1))
  with av.open(io.BytesIO(data)) as c:
    assert len(c.streams.audio) == 1
    frames = sum(1 for _ in c.decode(video=0))
  assert frames == 8 * 25   # the first SynthDyad test conversation: 8 s at 25 fps

  # The metrics table is rendered, with the model and the reference rows.
  tables = [m for c in nb.cells for m in _outputs(c, "text/markdown") if "| model |" in m]
  assert len(tables) == 1
  for row in ("ground truth", "mean motion", "shuffled audio"):
    assert f"| {row} |" in tables[0]
  with open(workdir / "eval" / "test.json") as f:
    assert json.load(f)["step"] == harness.NUM_STEPS
