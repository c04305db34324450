"""Compression passes: joint low-rank factors and their ranks (`factors`), calibration audio and input
moments (`calibration`), block importance and pruning (`layers`), int8/int4 weights (`quantize`)."""
