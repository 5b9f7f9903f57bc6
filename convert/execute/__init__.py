"""Executors: run a plan on the CPU workers or the GPUs, reading base rows through ``decode``."""
