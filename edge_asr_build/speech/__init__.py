"""Speech the build step makes and reads: synthesized voices (`synth`), written texts (`sentences`), and
the mixes of synthesized and recorded training audio with their augmentation (`training_audio`)."""
