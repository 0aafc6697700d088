"""Shared test setup: offline hub, CPU, float32 matmuls at full precision; fixtures used by several modules."""
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# For the processes started from here (the xdist workers, the CLI subprocesses): glibc's malloc maps XLA:CPU's
# per-call buffers afresh on every call, faulted in 4 KiB at a time; advised huge pages cut a train step's page faults
# ~30x (docs/training.md, "Training on CPU"). Read by the dynamic loader at process start, so not by this process.
if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
# The CLI's persistent compilation cache: one per test session (not the user's), shared by the subprocesses.
import tempfile  # noqa: E402

if "CLIPSEG_JAX_COMPILATION_CACHE" not in os.environ:  # created once, by the process that starts the workers
    import atexit  # noqa: E402
    import shutil  # noqa: E402

    os.environ["CLIPSEG_JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="clipseg-test-xla-")
    atexit.register(shutil.rmtree, os.environ["CLIPSEG_JAX_COMPILATION_CACHE"], ignore_errors=True)

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


# Session fixtures used by several modules are defined here, once: a fixture imported into several test modules is
# a separate session fixture in each, built once per module.
from data_fixtures import data_dir, manual_dir  # noqa: E402, F401


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """Where the trainer tests' tiny synthetic dataset is written (by the first run that needs it)."""
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="session")
def baseline(shapes_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An unbroken single-device `main.py train` run of the tiny config (6 steps, checkpoints at 3 and 6):
    (its workdir, the finished process). Tests only read the workdir."""
    from train_helpers import run_train, tiny_overrides

    wd = tmp_path_factory.mktemp("baseline")
    r = run_train(wd, tiny_overrides(shapes_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return wd, r
