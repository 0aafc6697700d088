"""Light package imports: the data pipelines' worker processes and config tools import neither TensorFlow
nor jax; heavy names load on first use."""
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "jax", "flax", "tensorflow_datasets")


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("code", [
    "import data_pipelines",
    "import clipseg_jax",
    "import clipseg_jax, data_pipelines; clipseg_jax.CLIPSegConfig",
    "import data_pipelines.pcplus, data_pipelines.sources",  # what a PC+ worker unpickles
    "import clipseg_jax.resize, clipseg_jax.prompts",
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
