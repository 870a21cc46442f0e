"""Import published weights into this codebase's checkpoint layout (NumPy/safetensors at run time).

    python -m avatar_jax.convert wav2vec2 --src <local HF folder> --out <dir>
    python -m avatar_jax.convert wan_vae  --src <diffusers folder or .safetensors> --out <dir>
    python -m avatar_jax.convert wan_dit  --src <diffusers WanTransformer3DModel folder> --out <dir>
    python -m avatar_jax.convert weights  --src <training workdir> --out <dir>   # weights only

Each converter writes an Orbax checkpoint that `config.init_from` (or `into="aux/<name>"` for a
frozen sub-model) loads, plus the architecture's config as JSON. Nothing is downloaded: `--src`
is a local folder the user fetched (e.g. with `huggingface-cli download`).
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function taking the argv after the name and returning the output dir, what it reads)
CONVERTERS = {
    "wav2vec2": ("avatar_jax.models.audio_wav2vec2", "convert_cli",
                 "Hugging Face Wav2Vec2Model / Wav2Vec2ForCTC folder (base or large-lv60)"),
    "wan_vae": ("avatar_jax.models.vae", "convert_cli",
                "diffusers AutoencoderKLWan folder or .safetensors (Wan 2.1 VAE)"),
    "wan_dit": ("avatar_jax.models.dit", "convert_cli",
                "diffusers WanTransformer3DModel folder (Wan 2.1 DiT)"),
    "weights": ("avatar_jax.checkpointing", "export_cli",
                "a training workdir: its EMA weights alone, without optimiser state"),
}


def usage() -> str:
  lines = ["usage: python -m avatar_jax.convert <name> --src <path> --out <dir>", "", "names:"]
  lines += [f"  {n:10s} {what}" for n, (_, _, what) in CONVERTERS.items()]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in CONVERTERS:
    print(f"unknown converter {name!r}; expected one of {sorted(CONVERTERS)}\n\n{usage()}",
          file=sys.stderr)
    return 2
  module, fn, _ = CONVERTERS[name]
  out = getattr(importlib.import_module(module), fn)(rest)
  if out:
    print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
