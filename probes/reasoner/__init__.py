"""The built-in reasoner `tiny-reasoner`: a synthetic reasoning task, its generator and training script.

`probes.reasoner.task` generates problems and trajectories (ordinary steps, reflections that
fix a planted mistake, delimiters); `probes.reasoner.train` trains the small
Qwen2-architecture model that ships in `probes/reasoner/checkpoint/`.
"""
