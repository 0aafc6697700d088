"""Light package imports: the data pipelines' worker processes and config tools import neither TensorFlow
nor jax; heavy names load on first use."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("tensorflow", "jax", "flax", "tensorflow_datasets")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def _heavy_loaded_by_failing_main(argv: list[str], message: str) -> set[str]:
    """Heavy packages loaded by `main.main(argv)` in a fresh process, which must exit 2 with one `error:` line
    holding `message`."""
    code = (f"import contextlib, io, main\nerr = io.StringIO()\nwith contextlib.redirect_stderr(err):\n"
            f"    rc = main.main({argv!r})\ne = err.getvalue()\n"
            f"assert rc == 2 and e.startswith('error: ') and e.count('\\n') == 1 and {message!r} in e, (rc, e)")
    return _loaded_after(code) & set(HEAVY)


@pytest.mark.parametrize("code", [
    "import data_pipelines",
    "import clipseg_jax",
    "import clipseg_jax, data_pipelines; clipseg_jax.CLIPSegConfig",
    "import data_pipelines.pcplus, data_pipelines.sources",  # what a PC+ worker unpickles
    "import clipseg_jax.resize, clipseg_jax.prompts",
    "import clipseg_jax.commands, clipseg_jax.train; clipseg_jax.train.load_config",
])
def test_light_imports(code):
    assert not _loaded_after(code) & set(HEAVY), code


def test_heavy_names_load_on_first_use():
    loaded = _loaded_after("import clipseg_jax; clipseg_jax.Predictor; import data_pipelines; data_pipelines.Phrasecut")
    assert {"jax", "flax", "tensorflow_datasets"} <= loaded
    import clipseg_jax

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        clipseg_jax.Nope  # noqa: B018
    assert {"Predictor", "from_pretrained", "CLIPSeg"} <= set(dir(clipseg_jax))


@pytest.mark.parametrize("override, message", [("--config.nope=1", "nope"), ("--config.total_steps=x", "total_steps")])
def test_a_bad_train_override_fails_before_jax_loads(tmp_path, override, message):
    """`main.py train` checks its config first: a mistyped override is one error line, with nothing heavy imported
    and nothing written."""
    argv = ["train", "--config", "configs/synthetic_shapes.py", "--workdir", str(tmp_path / "w"), override]
    assert not _heavy_loaded_by_failing_main(argv, message)
    assert not (tmp_path / "w").exists()
    import clipseg_jax.train

    assert {"train", "TrainingError", "load_config"} <= set(dir(clipseg_jax.train))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        clipseg_jax.train.Nope  # noqa: B018


@pytest.mark.parametrize("args, message", [
    (["--threshold", "2"], "--threshold 2.0: expected a probability"),
    (["--image", "{d}/nothing.jpg"], "nothing.jpg: no such image file"),
    (["--visual-prompt", "{d}/x.png:{d}/small.png"], "does not match its image"),
])
def test_bad_predict_input_fails_before_jax_loads(tmp_path, args, message):
    """`main.py predict` reads and checks its inputs with PIL and numpy only: a typo fails at once, before jax,
    the model or the output folder."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.full((5, 8), 255, np.uint8)).save(tmp_path / "small.png")
    args = [a.format(d=tmp_path) for a in args]
    base = [] if "--image" in args else ["--image", str(tmp_path / "x.png")]
    argv = ["predict", "--checkpoint", "CIDAS/no-such-model", *base, "--prompt", "a", *args, "--out",
            str(tmp_path / "o")]
    assert not _heavy_loaded_by_failing_main(argv, message)
    assert not (tmp_path / "o").exists()
