"""Shared test setup: offline hub, CPU, float32 matmuls at full precision; fixtures used by several modules."""
import json
import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's persistent compilation cache: one per test session (not the user's), shared by the subprocesses.
import tempfile  # noqa: E402

os.environ.setdefault("CLIPSEG_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="clipseg-test-xla-"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture
def lowerings():
    """Names of the programs jax lowers from now on, from jax.monitoring's public events: each lowering is a new
    compiled specialisation (compiled, or fetched from the persistent compilation cache); the eager ops jax compiles
    count too."""
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random CLIPSeg checkpoint written by save_pretrained (safetensors + tokenizer.json)."""
    from tiny_models import hf_config, make_model, save_checkpoint

    return save_checkpoint(make_model(hf_config()), tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_refined_hf_dir(tmp_path_factory):
    from tiny_models import hf_config, make_model, save_checkpoint

    cfg = hf_config(use_complex_transposed_convolution=True, reduce_dim=8, extract_layers=[0, 2], conditional_layer=1)
    return save_checkpoint(make_model(cfg, seed=1), tmp_path_factory.mktemp("tiny_refined_hf"))


@pytest.fixture(scope="session")
def pc_root(tmp_path_factory):
    """A small PhraseCut (VGPhraseCut_v0 layout) for the evaluation tests; read-only."""
    from eval_fixtures import write_phrasecut

    return write_phrasecut(tmp_path_factory.mktemp("pc"))


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory):
    """A small VOC2012 + SBD-aug layout with PFENet lists for the evaluation tests; read-only."""
    from eval_fixtures import write_voc

    return write_voc(tmp_path_factory.mktemp("voc"))


# The data fixtures' session-scoped fixtures, defined once here: imported into several test modules, each module
# would build its own copy.
from data_fixtures import data_dir, manual_dir  # noqa: E402, F401


def _session_shared_dir(tmp_path_factory) -> Path:
    """A temporary directory of this test session that its xdist workers share (the session's base directory:
    each worker's own base is a sub-directory of it); without xdist, the base directory itself."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """Where the trainer tests' tiny synthetic dataset is written, by the first run that needs it
    (`synthetic.prepare` serialises concurrent first uses); one per session, shared by the xdist workers."""
    d = _session_shared_dir(tmp_path_factory) / "shapes"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def baseline(shapes_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An unbroken single-device `main.py train` run of the tiny config (6 steps, checkpoints at 3 and 6):
    (its workdir, the finished process). Run once per session: the first xdist worker to ask runs it under a file
    lock, the others wait and read its record. Tests only read the workdir."""
    import fcntl

    from train_helpers import run_train, tiny_overrides

    shared = _session_shared_dir(tmp_path_factory)
    wd, record = shared / "baseline", shared / "baseline.json"
    with open(shared / "baseline.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.exists():
            shutil.rmtree(wd, ignore_errors=True)  # a failed attempt of another worker: start over, do not resume
            r = run_train(wd, tiny_overrides(shapes_dir))
            assert r.returncode == 0, r.stderr[-3000:]
            record.write_text(json.dumps({"args": r.args, "stdout": r.stdout, "stderr": r.stderr}))
    rec = json.loads(record.read_text())
    return wd, subprocess.CompletedProcess(rec["args"], 0, rec["stdout"], rec["stderr"])
