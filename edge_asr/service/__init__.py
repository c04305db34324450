"""The device service: the daemon (`edge-asr daemon`), its sinks and JSONL spool, the MQTT publisher and
broker settings, and the plant side's collector (`edge-asr collect`)."""
