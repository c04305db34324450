"""Streaming LSTM-CTC models: trained from scratch (`model`, `ctc_train`, `ctc_data`, `recipe`) or converted
from Whisper's encoder (`cald`, `cald_train`), exported (`export`, `cald_export`) and bundled (`bundle`)."""
