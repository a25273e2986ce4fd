"""Pretraining: its inputs (where data meets views), the step, the stages of a run, the run
folder, checkpoints, processes, the `amdim pretrain` command; and the commands that measure a
step (`amdim benchmark`) and export an encoder from a checkpoint (`amdim export`)."""
