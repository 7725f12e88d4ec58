"""The user install: optional heavy packages are imported only when used, and a missing checkpoint with no
network is a one-line error within seconds, also when HF_HUB_OFFLINE is unset."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The run as `suder run` does it, then which optional packages the process imported on its way.
REPORT_IMPORTS = (
    "import sys\n"
    "from suder.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('IMPORTED', *sorted(m for m in ('deepspeed', 'tensorboard') if m in sys.modules), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed installed to matter")
def test_a_run_without_deepspeed_launch_never_imports_it(tiny_toy_path, tmp_path):
    """DeepSpeed installed (the [deepspeed] extra) but not launched: no import, no "Setting accelerator" warning
    (accelerate's ``unwrap_model`` imports it whenever it is installed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    args = ["run", "--model", tiny_toy_path, "--output-dir", str(tmp_path / "r"), "--steps", "1", "--group-size",
            "2", "--gen-batch-size", "2", "--und-batch-size", "2", "--eval-num", "4"]
    proc = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *args], capture_output=True, text=True,
                          env=dict(env, OMP_NUM_THREADS="1"), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported = [line for line in proc.stderr.splitlines() if line.startswith("IMPORTED")]
    assert imported == ["IMPORTED"], proc.stderr
    assert "Setting accelerator" not in proc.stdout + proc.stderr
    assert "after" in proc.stdout


@pytest.fixture
def refused_endpoint():
    """An HF_ENDPOINT on a local port that refuses connections at once: nothing here waits on a real network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused immediately
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# Imports first, so that the time measured is the loading alone (imports are seconds on a busy machine).
LOAD_MISSING = (
    "import sys, time\n"
    "import transformers, suder\n"
    "from suder.errors import BackboneError\n"
    "name, model = sys.argv[1:3]\n"
    "start = time.perf_counter()\n"
    "try:\n"
    "    suder.load_backbone(name, model=model, device='cpu')\n"
    "except BackboneError as exc:\n"
    "    print(f'{time.perf_counter() - start:.2f}')\n"
    "    print(exc)\n"
)


def missing_checkpoint(backbone: str, model: str, endpoint: str, tmp_path: Path) -> tuple[float, str]:
    """(seconds, error) of ``load_backbone(backbone, model=model)`` in a process with HF_HUB_OFFLINE unset, an
    empty Hugging Face cache and the Hub at ``endpoint``."""
    drop = {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
            "ALL_PROXY", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_MISSING, backbone, model], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    return float(lines[0]), lines[1]


@pytest.mark.parametrize(
    ("backbone", "model"),
    [("janus-pro", "deepseek-community/Janus-Pro-1B"), ("show-o", "showlab/show-o")],
)
def test_missing_checkpoint_with_no_hub_fails_fast_without_hf_hub_offline(backbone, model, refused_endpoint,
                                                                          tmp_path):
    """Without the connection check huggingface_hub retries every file with backoff (minutes); with it, one
    refused connection and the cache-only load's one-line error."""
    seconds, error = missing_checkpoint(backbone, model, refused_endpoint, tmp_path)
    assert seconds < 10, f"{seconds} s to fail"
    assert model in error and "hf download" in error and "cannot be reached" in error, error


def test_a_local_folder_or_hf_hub_offline_skips_the_connection_check(tmp_path, monkeypatch):
    from suder import registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert registry._may_download("owner/name") and registry._may_download(None)
    (tmp_path / "owner").mkdir()
    monkeypatch.chdir(tmp_path)
    for local in ("owner", "./x", "/abs/path", "~/m", "a/b/c"):
        assert not registry._may_download(local), local
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not registry._may_download("owner/name")


def test_offline_mode_is_restored_after_loading(monkeypatch):
    from huggingface_hub import constants

    from suder import registry

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with registry._hub_offline():
        assert constants.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not constants.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ


def test_a_deepspeed_launch_without_deepspeed_names_the_extra(monkeypatch):
    from suder.distributed import launched_engine
    from suder.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    if importlib.util.find_spec("deepspeed") is not None:
        assert launched_engine() == "deepspeed"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'suder\[deepspeed\]'"):
        launched_engine()


SAVE_JANUS = (
    "import contextlib, sys, tempfile\n"
    "from pathlib import Path\n"
    "sys.path.insert(0, 'tests')\n"
    "from janus_tiny import tiny_backbone\n"
    "from suder.outputs import ModelsToSave, RunWriter\n"
    "backbone, out = tiny_backbone(), Path(tempfile.mkdtemp())\n"
    "view = contextlib.contextmanager(lambda: (yield backbone))\n"
    "if sys.argv[1] == 'run':\n"
    "    RunWriter(out, True).save_models(ModelsToSave({'': view}, None), out / 'final')\n"
    "elif sys.argv[1] == 'pretrain':\n"
    "    from suder.pretrain import pretrain\n"
    "    pretrain(backbone, out=str(out / 'final'), steps=1, batch_size=2, caption_batch_size=2)\n"
    "else:\n"
    "    backbone.save_pretrained(str(out / 'final'))\n"
    "assert (out / 'final' / 'config.json').is_file()\n"
    "print('IMPORTED', 'deepspeed' in sys.modules)\n"
)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed installed to matter")
def test_saving_a_transformers_backbone_outside_a_deepspeed_launch_never_imports_it():
    """Janus-Pro (and Emu3) save through transformers' save_pretrained, whose unwrap imports DeepSpeed when it is
    installed; a run's save and ``suder pretrain``'s do not (the plain call, the control, does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    outputs = {}
    for how in ("run", "pretrain", "plain"):
        proc = subprocess.run([sys.executable, "-c", SAVE_JANUS, how], capture_output=True, text=True, cwd=ROOT,
                              env=dict(env, OMP_NUM_THREADS="1"), timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs[how] = proc.stdout + proc.stderr
    for how in ("run", "pretrain"):
        assert "IMPORTED False" in outputs[how] and "Setting accelerator" not in outputs[how], how
    assert "IMPORTED True" in outputs["plain"]  # the control: without the guard, the save imports it
