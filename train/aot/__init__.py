"""Ahead-of-time compilation of a study's programs for real accelerator topologies, without them
(`python -m train.aot`): per program and chip, the bytes it needs, whether it fits, its FLOPs (the model's formula)
and a lower bound on its time. hardware.py (presets, the TPU compiler), programs.py (what is compiled),
report.py (the numbers)."""
