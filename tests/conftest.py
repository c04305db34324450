"""Shared fixtures: the real tiny.en model, bundles built from it, and synthesized speech.

Everything is made here from installed packages (the embedded tiny.en weights, a piper voice); no test
reads recorded data from outside the repository.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

# The suite's two workers (pytest-xdist, pyproject's addopts) share the cores: OpenMP threads that spin while
# they wait took the cores from the other worker's (a 15 s test took 190 s); passive threads sleep instead.
# Set before torch is imported, here and in every process the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SENTENCES = [
    "Replace the hydraulic filter on press number four before the night shift.",
    "The coolant hose on the north conveyor is leaking again.",
    "Call the supervisor and stop the packaging line.",
]


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """$EDGE_ASR_THREADS (default 2) sets every thread count of the suite: torch's in this process here, every
    recognizer's and every command's by itself (`edge_asr.threads`). The suite passes at 1 and at 2."""
    import torch

    from edge_asr.threads import resolve_threads

    torch.set_num_threads(resolve_threads())


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Keep caches (synthesized sets, bundles) out of the user's home."""
    home = tmp_path_factory.mktemp("edge_asr_home")
    old = os.environ.get("EDGE_ASR_HOME")
    os.environ["EDGE_ASR_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("EDGE_ASR_HOME", None)
    else:
        os.environ["EDGE_ASR_HOME"] = old


@pytest.fixture(scope="session")
def tiny():
    from edge_asr_build.sources import load_whisper

    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def speech() -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz audio) for a few maintenance sentences spoken by the default piper voice."""
    from edge_asr_build.speech.synth import synthesize

    return [(text, synthesize(text)) for text in SENTENCES]


@pytest.fixture(scope="session")
def stream(speech):
    """The synthesized sentences joined by 1.2 s pauses: (audio, texts, [(speech_start_s, speech_end_s)])."""
    pause = 1.2
    parts, spans, t = [np.zeros(8000, np.float32)], [], 0.5
    for _, audio in speech:
        voiced = np.flatnonzero(np.abs(audio) > 0.01)
        spans.append((t + voiced[0] / 16000, t + voiced[-1] / 16000))
        parts += [audio, np.zeros(int(pause * 16000), np.float32)]
        t += len(audio) / 16000 + pause
    return np.concatenate(parts), [text for text, _ in speech], spans


@pytest.fixture(scope="session")
def stream_wav(stream, tmp_path_factory):
    from edge_asr_build.speech.synth import write_wav

    path = tmp_path_factory.mktemp("stream") / "stream.wav"
    write_wav(path, stream[0])
    return path


# -- the shared bundles: built once per run, in the background ------------------------------------------------

# In-process as the build step's API makes them: tiny.en, the 30 s model, with every format.
BUILD_WHISPER = """
import sys
from edge_asr_build.bundle.pipeline import build_whisper_bundle
build_whisper_bundle(
    "tiny.en", sys.argv[1], sys.argv[2], evaluate_on=0, formats=["onnx", "ort", "tflite"], threads=int(sys.argv[3])
)
"""


def _bundle_builds(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """Fixture name -> (bundle folder, the command that builds it), in the order the suite first needs them."""
    int8, fp32, auto = root / "tiny.en-int8", root / "tiny.en-fp32", root / "tiny.en-auto-int8"
    return {
        "bundle_int8": (int8, [sys.executable, "-c", BUILD_WHISPER, str(int8), "int8", "1"]),
        # the default bundle as `edge-asr build` makes it with no model flags (tiny.en, the shipped
        # dynamic-context delta, int8), with ONNX and TFLite models
        "bundle_auto": (
            auto,
            [sys.executable, "-m", "edge_asr", "build", "--out", str(auto), "--eval", "0", "--formats", "onnx,tflite"],
        ),  # fmt: skip
        # at 2 threads, as `edge-asr build` on a multi-core machine: the TFLite encoder is converted in a
        # process of its own while the decoder converts (the others build at the suite's one thread)
        "bundle_fp32": (fp32, [sys.executable, "-c", BUILD_WHISPER, str(fp32), "fp32", "2"]),
    }


class BackgroundBuilds:
    """Builds the bundles this run's tests use, in a thread of their own, from the moment the tests are
    collected: the builds (minutes of export and conversion) overlap the tests that need no bundle. The
    suite's workers (pytest-xdist) share one folder of bundles: each bundle is built by the worker that
    takes its lock first, while the other builds the next one or waits for it. A fixture waits for its own
    bundle; a failed build fails the tests that need it, in every worker."""

    def __init__(self, builds: dict[str, tuple[Path, list[str]]], env: dict):
        self.builds, self.env = builds, env
        self.done = {name: threading.Event() for name in builds}
        self.failed: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        # First the bundles no other worker is building; then, waiting for their locks, the rest: a bundle
        # whose builder stopped first (its worker ran out of tests) is built here.
        try:
            waiting = [name for name in self.builds if not self._build(name, wait=False)]
            for name in waiting:
                self._build(name, wait=True)
        finally:  # a build that could not even start (a lock file, a process) fails its tests, not hangs them
            for event in self.done.values():
                event.set()

    def _build(self, name: str, wait: bool) -> bool:
        """Build `name` unless it is built or failed already; False if another worker holds its lock."""
        folder, command = self.builds[name]
        failure = folder.with_name(folder.name + ".failed")
        with open(folder.with_name(folder.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            if not (folder / "manifest.json").exists() and not failure.exists() and not self.stopped:
                shutil.rmtree(folder, ignore_errors=True)  # what a stopped builder left
                env = self.env | {"EDGE_ASR_HOME": str(folder.with_name(folder.name + ".home"))}  # one each
                self.process = subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
                _, stderr = self.process.communicate()
                if self.process.returncode != 0 and not self.stopped:
                    failure.write_text(stderr[-3000:] or f"exit status {self.process.returncode}")
            if failure.exists():
                self.failed[name] = failure.read_text()
        self.done[name].set()
        return True

    def wait(self, name: str) -> Path:
        self.done[name].wait()
        assert name not in self.failed, f"building {name} failed:\n{self.failed[name]}"
        folder = self.builds[name][0]
        assert (folder / "manifest.json").exists(), f"{name} was not built (the run stopped first)"
        return folder

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self.thread.join(timeout=30)


_background: BackgroundBuilds | None = None
BUNDLES = pytest.StashKey[Path]()


def pytest_configure(config):
    """The run's folder of shared bundles: made by the main process, handed to the workers."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        config.stash[BUNDLES] = Path(workerinput["edge_asr_bundles"])
        return
    root = Path(tempfile.mkdtemp(prefix="edge-asr-test-bundles-"))
    config.stash[BUNDLES] = root
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["edge_asr_bundles"] = str(node.config.stash[BUNDLES])


def pytest_collection_finish(session):
    """Start building the bundles the collected tests use, at $EDGE_ASR_THREADS=1 (fp32 aside, see
    `_bundle_builds`): the tests keep the rest."""
    global _background
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if "transcriber_int8" in used:
        used.add("bundle_int8")
    root = session.config.stash[BUNDLES]
    builds = {name: build for name, build in _bundle_builds(root).items() if name in used}
    if builds:
        env = os.environ | {"EDGE_ASR_THREADS": "1"}
        _background = BackgroundBuilds(builds, env)


def pytest_sessionfinish(session):
    if _background is not None:
        _background.stop()


@pytest.fixture(scope="session")
def bundle_int8():
    return _background.wait("bundle_int8")


@pytest.fixture(scope="session")
def bundle_fp32():
    return _background.wait("bundle_fp32")


@pytest.fixture(scope="session")
def bundle_auto():
    return _background.wait("bundle_auto")


@pytest.fixture(scope="session")
def transcriber_int8(bundle_int8):
    from edge_asr import Transcriber

    return Transcriber(bundle_int8)


def _reference_items(tiny, texts, seed):
    from edge_asr_build.matching.data import reference_items
    from edge_asr_build.speech.synth import synthesize
    from edge_asr_build.whisper.mel import mel_filters
    from edge_asr_build.whisper.vocabulary import decoding_rules

    clips = [synthesize(t) for t in texts]
    return reference_items(
        tiny.model,
        clips,
        mel_filters(),
        decoding_rules(tiny),
        lambda text: [],
        [],
        seed=seed,
        mode_shares={"plain": 1.0},
    )


@pytest.fixture(scope="session")
def short_items(tiny):
    """Reference items of a few short synthesized phrases (train, held out) for reference-matching runs."""
    train = _reference_items(tiny, ["Stop the line.", "Seven.", "Open the valve.", "Next.", "Four two."], 0)
    held = _reference_items(tiny, ["Close the ticket.", "Nine."], 1)
    return train, held


def teacher_clips(encoder, count=6, seed=0):
    """Clips of smooth random mel with the teacher's real states on them (LSTM conversion tests)."""
    import torch

    from edge_asr_build.lstm.cald import teacher_stream
    from edge_asr_build.lstm.cald_data import Clip

    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        frames = 2 * int(rng.integers(40, 90))
        mel = torch.from_numpy(np.cumsum(rng.normal(0, 0.1, (80, frames)), 1).astype(np.float32) - 0.5)
        xs, ms = teacher_stream(encoder, mel[None])
        clips.append(Clip(mel.half(), torch.cat([*xs, *ms])[:, : frames // 2].half(), torch.tensor([3, 4]), "ab"))
    return clips


def run_cli_without_torch(args: list[str], also_block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`edge-asr ARGS` in a process where importing torch, librosa or the build step (and `also_block`)
    fails, and which fails if any heavy module got imported all the same: the runtime must need none of them."""
    script = _script_without_torch(args, also_block)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def start_cli_without_torch(args: list[str]) -> subprocess.Popen:
    """The same as `run_cli_without_torch`, for a command that serves until stopped: stderr piped."""
    script = _script_without_torch(args, ())
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)


def _script_without_torch(args: list[str], also_block: tuple[str, ...]) -> str:
    blocked = ("torch", "librosa", "edge_asr_build", *also_block)
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from edge_asr.cli import main
code = main({args!r})
assert not any(m.split('.')[0] in ('torch', 'librosa') for m in sys.modules), 'heavy module imported'
sys.exit(code)
"""
    return script
