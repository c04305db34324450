"""The build step's commands behind `edge-asr-build` (and `edge-asr`, which forwards them): one module per
model family, the demo, and progress on stderr."""
