"""PC+ batches built in worker processes (`PCPlus(workers=N)`): same batches as `batch(step)`, in
order, resumable, never overwritten while referenced, errors and bad arguments reported, nothing left behind."""
import gc
import multiprocessing
import os
import pickle
import threading
import time

import numpy as np
import pytest

from data_pipelines.pcplus import PCPlus
from data_pipelines.sources import CachedSource, Source, TfdsSource, build_cache

# These tests compare /dev/shm before and after: with pytest-xdist they share one worker with every other test
# that starts PC+ worker processes (group "pcplus_shared_memory"), so no other test's blocks come and go meanwhile.
pytestmark = pytest.mark.xdist_group("pcplus_shared_memory")


@pytest.fixture(scope="module")
def cached(data_dir, tmp_path_factory):
    return CachedSource(build_cache(TfdsSource("train", data_dir), tmp_path_factory.mktemp("cache") / "c", size=64))


class FailingSource(Source):
    """Picklable (module level) source whose task 3 cannot be read."""

    def __init__(self, inner: Source):
        self.inner = inner
        self.phrases = inner.phrases
        self.image_keys = inner.image_keys

    def read(self, index):
        if index == 3:
            raise ValueError("task 3: corrupt bytes")
        return self.inner.read(index)


def _pipe(source, **kw):
    args = dict(batch_size=4, seed=5, process_index=0, process_count=1, image_size=64)
    args.update(kw)
    return PCPlus(source, **args)


def _shm_names():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _assert_same(batch, ref):
    assert list(batch) == list(ref)
    for k in ref:
        assert np.array_equal(batch[k], ref[k]), k


def _worker_processes():
    return [p for p in multiprocessing.active_children() if p.is_alive()]


def _wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return cond()


@pytest.mark.parametrize("render", ["host", "device"])
def test_workers_yield_batch_of_each_step_in_order(cached, render):
    ref = _pipe(cached, support_render=render)
    before = _shm_names()
    it = _pipe(cached, support_render=render, workers=2).iterator(start_step=7, num_steps=5)
    got = list(it)  # all held at once: none is overwritten by a later batch
    assert len(got) == 5 and it.state()["step"] == 12
    for i, batch in enumerate(got):
        _assert_same(batch, ref.batch(7 + i))
    assert len({b["image"].ctypes.data for b in got}) == 5
    it.close()
    _assert_same(got[-1], ref.batch(11))  # handed-out batches stay valid after close
    del got, batch
    assert _wait_until(lambda: _shm_names() <= before)  # every shared-memory block unlinked once freed


def test_workers_keep_batches_intact_and_resume(cached):
    ref = _pipe(cached)
    pipe = _pipe(cached, workers=1)
    it = pipe.iterator()
    kept = None
    for step in range(12):
        batch = next(it)
        _assert_same(batch, ref.batch(step))
        if step == 2:  # views (a slice, a reshape as for sharding) outlive the batch dict
            kept = (batch["image"][1:], batch["mask"].reshape(2, 2, 64, 64))
        del batch
    want = ref.batch(2)
    assert np.array_equal(kept[0], want["image"][1:]) and np.array_equal(kept[1].reshape(4, 64, 64), want["mask"])
    state = it.state()
    it.close()
    resumed = type(it).restore(pipe, state)
    _assert_same(next(resumed), ref.batch(12))
    resumed.close()


def test_workers_stop_at_the_end_and_when_one_dies(cached):
    before = set(_worker_processes())
    it = _pipe(cached, workers=2).iterator(num_steps=2)
    assert len(list(it)) == 2
    assert _wait_until(lambda: set(_worker_processes()) <= before)  # gone at the end, without close()
    it = _pipe(cached, workers=2).iterator()
    next(it)
    started = [p for p in _worker_processes() if p not in before]
    assert started
    started[-1].kill()
    started[-1].join(timeout=30)  # dead before the next batch is asked for (else the other worker may serve it)
    with pytest.raises(RuntimeError, match=r"PC\+ worker process pcplus-worker-\d exited with code -9"):
        for _ in range(20):
            next(it)
    with pytest.raises(RuntimeError, match="exited with code"):  # the same error again, not StopIteration
        next(it)
    it.close()
    assert _wait_until(lambda: set(_worker_processes()) <= before)


def test_worker_error_names_the_batch(cached):
    it = _pipe(FailingSource(cached), workers=1, batch_size=len(cached.phrases)).iterator()
    with pytest.raises(RuntimeError, match=r"PC\+ worker failed on batch 0: ValueError: task 3: corrupt bytes"):
        next(it)
    it.close()


class SubCached(CachedSource):
    def read_mask(self, index):
        return 1 - super().read_mask(index)


def test_source_subclass_and_user_module_in_workers(cached, tmp_path, monkeypatch):
    sub = SubCached(cached.cache_dir)
    assert type(pickle.loads(pickle.dumps(sub))) is SubCached
    ref = _pipe(sub)
    it = _pipe(sub, workers=1).iterator(num_steps=1)
    _assert_same(next(it), ref.batch(0))
    it.close()
    # A Source module importing from the packages' __init__s works in a worker.
    (tmp_path / "user_source_mod.py").write_text(
        "from clipseg_jax import CLIPTokenizer  # noqa\n"
        "from data_pipelines import make_pcplus  # noqa\n"
        "from data_pipelines.sources import Source\n"
        "class UserSource(Source):\n"
        "    def __init__(self, inner):\n"
        "        self.inner, self.phrases, self.image_keys = inner, inner.phrases, inner.image_keys\n"
        "    def read(self, index):\n"
        "        return self.inner.read(index)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from user_source_mod import UserSource

    it = _pipe(UserSource(cached), workers=1).iterator(num_steps=1)
    _assert_same(next(it), _pipe(cached).batch(0))
    it.close()


def test_workers_bad_arguments(cached):
    with pytest.raises(ValueError, match="workers must be an integer >= 0"):
        _pipe(cached, workers=-1)

    class Locked(FailingSource):  # holds a lock: cannot be pickled to a worker
        def __init__(self, inner):
            super().__init__(inner)
            self.lock = threading.Lock()

    with pytest.raises(ValueError, match="needs a picklable source; Locked is not"):
        _pipe(Locked(cached), workers=1).iterator()

    class OwnInit(CachedSource):
        def __init__(self, path, extra):
            super().__init__(path)

    with pytest.raises(ValueError, match="OwnInit subclasses CachedSource with its own __init__"):
        _pipe(OwnInit(cached.cache_dir, 1), workers=1).iterator()


def test_sources_pickle_by_reference(cached, data_dir):
    again = pickle.loads(pickle.dumps(cached))
    assert again.cache_dir == cached.cache_dir and len(pickle.dumps(cached)) < 1000
    np.testing.assert_array_equal(again.read(2)[0], cached.read(2)[0])
    tf_src = TfdsSource("train", data_dir)
    again = pickle.loads(pickle.dumps(tf_src))
    assert again.phrases == tf_src.phrases and again.task_ids == tf_src.task_ids
    for i in (0, 1, len(tf_src) - 1):
        for a, b in zip(again.read(i), tf_src.read(i)):
            np.testing.assert_array_equal(a, b)
    it = _pipe(tf_src, workers=1).iterator(start_step=2, num_steps=1)
    _assert_same(next(it), _pipe(tf_src).batch(2))
    it.close()


def test_example_parser_reads_what_tensorflow_reads(data_dir):
    """TfdsSource parses records without TensorFlow: the bytes equal TensorFlow's own parse of each record."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from tensorflow.core.example import example_pb2

    src = TfdsSource("train", data_dir)
    builder = tfds.builder("phrasecut", data_dir=str(data_dir))
    records = ArrayRecordDataSource([os.fspath(p) for p in builder.info.splits["train"].filepaths])
    assert len(records) == len(src)
    for i in range(len(src)):
        ref = example_pb2.Example.FromString(records[i]).features.feature
        assert src.encoded(i) == (ref["image"].bytes_list.value[0], ref["mask"].bytes_list.value[0])
