"""Whisper's encoder converted to LSTM blocks (CALD): the transfer, streaming, joint SVD, export, and the
distillation losses on the real tiny.en encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import teacher_clips

from edge_asr_build.lstm.cald import (
    CaldCtc,
    compress_cald,
    from_whisper,
    joint_factor,
    load_cald,
    lstm_matrix_params,
    save_cald,
)
from edge_asr_build.lstm.cald_data import collate, transcript_text
from edge_asr_build.lstm.cald_train import CaldRecipe, layerwise_loss, lstm_params, run_stage, stream_loss


@pytest.fixture(scope="module")
def encoder():
    from edge_asr_build.sources import load_whisper

    return load_whisper("tiny.en").model.encoder.eval()


@pytest.fixture(scope="module")
def converted(encoder) -> CaldCtc:
    torch.manual_seed(0)
    return from_whisper(encoder).eval()


def _log_mel(frames=120, seed=1) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(-3, 1.5, (1, frames, 80)).astype(np.float32))


def test_transferred_front_end_reproduces_whisper_convolutions(encoder, converted):
    """Output m of the streaming front end is Whisper's frame m - 1 (before positions), away from the start."""
    mel = converted.normalize(_log_mel())
    with torch.no_grad():
        ours = converted.front(mel, *converted.initial_state()[:2])[0]
        x = torch.nn.functional.gelu(encoder.conv1(mel))
        whisper = torch.nn.functional.gelu(encoder.conv2(x)).transpose(1, 2)
    assert (ours[0, 2:-1] - whisper[0, 1:-2]).abs().max() < 1e-4
    for ours_block, whisper_block in zip(converted.blocks, encoder.blocks):
        assert torch.equal(ours_block.mlp[0].weight, whisper_block.mlp[0].weight)


def test_chunks_give_the_whole_utterance(converted):
    log_mel = _log_mel(100)
    with torch.no_grad():
        whole, _ = converted(log_mel)
        state, parts = None, []
        for start in range(0, 100, 14):
            out, state = converted(log_mel[:, start : start + 14], state)
            parts.append(out)
    assert (torch.cat(parts, 1) - whole).abs().max() < 1e-4


def test_joint_svd_at_full_rank_reproduces_outputs_and_one_third_meets_its_budget(converted):
    n = converted.config.n_state
    full = joint_factor(converted, {f"block{i}": n for i in range(4)} | {f"input{i}": n for i in range(4)})
    log_mel = _log_mel()
    with torch.no_grad():
        assert (full(log_mel)[0] - converted(log_mel)[0]).abs().max() < 1e-4
    third, _ = compress_cald(converted, 1 / 3)
    assert lstm_matrix_params(third) <= lstm_matrix_params(converted) / 3
    for block in third.blocks:
        r = block.lstm.proj_size
        assert 0 < r < n and block.out.weight.shape == (n, r) and block.lstm.weight_hh_l0.shape[1] == r


@pytest.mark.parametrize("factored", [False, True])
def test_exported_graph_streams_as_torch(converted, tmp_path, factored):
    import onnxruntime as ort

    from edge_asr_build.lstm.cald_export import export_cald

    model = compress_cald(converted, 1 / 3)[0] if factored else converted
    path = export_cald(model, tmp_path / "cald.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()[1:]
    state = [np.zeros(i.shape, np.float32) for i in inputs]
    features = _log_mel(80, seed=3)[0].numpy()
    outputs = []
    for start in range(0, 80, 16):
        out, *state = session.run(
            None, {"features": features[start : start + 16], **{i.name: s for i, s in zip(inputs, state)}}
        )
        outputs.append(out)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)[None])[0][0].numpy()
    assert np.abs(np.concatenate(outputs) - expected).max() < 1e-3


def test_checkpoint_round_trip(converted, tmp_path):
    third = compress_cald(converted, 1 / 3)[0]
    loaded, meta = load_cald(save_cald(third, tmp_path / "m", {"note": "x"}))
    assert meta["note"] == "x" and loaded.config == third.config
    log_mel = _log_mel()
    with torch.no_grad():
        assert torch.equal(loaded(log_mel)[0], third.eval()(log_mel)[0])


def test_collate_aligns_the_student_one_frame_behind_the_teacher(encoder, converted):
    clips = teacher_clips(encoder, 2)
    mel, targets, mask = collate(clips, converted)
    assert mel.shape[-1] == 2 * targets.shape[2]
    for i, c in enumerate(clips):
        assert torch.equal(targets[i, :, 1 : c.steps + 1], c.targets.float())
        assert not mask[i, 0] and mask[i, 1 : c.steps].all() and not mask[i, c.steps :].any()


def test_layerwise_then_joint_distillation_lower_the_losses(encoder):
    torch.manual_seed(0)
    model = from_whisper(encoder)
    clips, held_out = teacher_clips(encoder, 6, seed=1), teacher_clips(encoder, 2, seed=2)
    recipe = CaldRecipe(batch_frames=300, eval_every=5)
    with torch.no_grad():
        before = float(stream_loss(model, held_out))
    layerwise = run_stage(
        "layerwise",
        model,
        [{"params": lstm_params(model), "lr": 3e-3}],
        layerwise_loss,
        clips,
        held_out,
        15,
        recipe,
        log=lambda m: None,
    )
    assert layerwise["held_out_best"] < 0.8 * layerwise["curve"][0]["held_out"]
    joint = run_stage(
        "joint",
        model,
        [{"params": lstm_params(model), "lr": 1e-3}],
        stream_loss,
        clips,
        held_out,
        10,
        recipe,
        log=lambda m: None,
    )
    assert joint["held_out_best"] < before


def test_transcript_text_skips_the_prompt_and_timestamps():
    decoding = {"special_tokens": {"sot": 50257, "eot": 50256}}
    tokens = torch.tensor([50360, 11, 12, 50257, 50362, 50363, 40, 41, 50400])
    assert transcript_text(tokens, decoding, lambda ids: " ".join(map(str, ids))) == "40 41"


def test_cli_convert_refuses_a_missing_folder_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, run_cli

    assert_one_line_error(
        run_cli("lstm", "convert", "--out", tmp_path / "m", "--corpus", tmp_path / "nowhere"), "no such folder"
    )


@pytest.fixture(scope="module")
def cald_bundle(converted, tmp_path_factory):
    from edge_asr_build.lstm.bundle import build_lstm_bundle

    folder = tmp_path_factory.mktemp("cald")
    checkpoint = save_cald(compress_cald(converted, 1 / 3)[0], folder / "third")
    build_lstm_bundle(checkpoint, folder / "bundle", "int8", evaluate=False, formats=["onnx", "tflite"])
    return folder / "bundle", checkpoint


def test_int8_bundle_runs_in_the_streaming_runtime_on_both_backends(cald_bundle, speech):
    from edge_asr.bundle import Bundle
    from edge_asr.ctc_transcriber import CtcTranscriber

    path, checkpoint = cald_bundle
    bundle = Bundle.load(path)
    assert bundle.manifest.raw["model"]["architecture"] == "cald" and bundle.manifest.frontend.stack == 2
    audio = speech[0][1]
    onnx, tflite = CtcTranscriber(bundle, backend="onnx"), CtcTranscriber(bundle, backend="tflite")
    features = onnx.stream().features.accept(audio)[:64]
    model, _ = load_cald(checkpoint)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)[None])[0][0].exp().numpy()
    for transcriber in (onnx, tflite):
        probs = np.exp(transcriber.model.run(features, transcriber.model.initial_state())[0])
        assert np.abs(probs - expected).max() < 0.05  # int8 weights against float32 torch
        stream = transcriber.stream()
        for start in range(0, len(audio), 3200):
            stream.accept(audio[start : start + 3200])
        assert stream.finish() == transcriber.transcribe(audio).text
