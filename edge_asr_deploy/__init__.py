"""Packaging, deployment and on-device benchmarking for edge targets (installed as `edge_asr_deploy`,
command `edge-asr-deploy`). Runs on the workstation; what runs on a device is the archive it makes."""
