"""Whisper in the build step: load a pretrained model (CTranslate2, openai `.pt`, Hugging Face), export it
(ONNX, TFLite) and package a bundle; `pipeline` strings the passes together."""
