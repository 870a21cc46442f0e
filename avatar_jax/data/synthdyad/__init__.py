"""SynthDyad: the built-in procedural dyadic conversation benchmark (see docs/synthdyad.md).

Entry point: `from avatar_jax.data.synthdyad import generator as sd; sd.make_sample(split, index)`.
"""
