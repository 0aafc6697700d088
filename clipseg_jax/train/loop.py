"""The trainer, top-down: config -> mesh -> data -> model and state (or resume) -> jitted sharded step -> loop
(log, checkpoint, validate, faults) -> the trained model in WORKDIR/model.

    python main.py train --config configs/rd64_uni.py --workdir runs/rd64 [--config.key=value ...]

WORKDIR holds config.json, metrics.jsonl (one JSON object per logged step, and the validation metrics),
TensorBoard event files, checkpoints/ (orbax), eval_metrics.json and model/ at the end. Rerunning the same
command resumes from the newest complete checkpoint; the losses then equal those of an unbroken run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipseg_jax._io import write_atomic
from clipseg_jax.model.decoder import resolve_pair_chunk
from clipseg_jax.train import state as st
from clipseg_jax.train.checkpoint import Checkpoints, fingerprint
from clipseg_jax.train.config import ConfigError, to_json
from clipseg_jax.train.data import TrainBatches, eval_batches, train_keys
from clipseg_jax.train.step import Recipe, make_eval_step, make_train_step

log = logging.getLogger("clipseg_jax.train")

#: Dense bf16 peak FLOP/s per device, for MFU (perf-anchors §1.5). Matched against `device.device_kind`.
PEAK_FLOPS = (("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12), ("TPU v4", 275e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
              ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


def peak_flops(device, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def init_distributed(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize()` with the config's coordinator, or auto-detected (TPU pods, SLURM, ...);
    a single process needs nothing."""
    d = config.distributed
    if d.coordinator_address:
        jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
        return
    if any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                     "JAX_COORDINATOR_ADDRESS")):
        try:
            jax.distributed.initialize()
        except (RuntimeError, ValueError) as e:  # a launcher variable without a multi-process job: go on alone
            log.warning("jax.distributed.initialize() did not start (%s); training in one process", e)


class _Signals:
    """SIGTERM / SIGINT -> save at the next step boundary and exit 0 (one process). Under jax.distributed the
    preemption notifier JAX installs takes SIGTERM instead (`CheckpointManager.reached_preemption`), so that
    every process saves the same step."""

    def __init__(self, multiprocess: bool):
        self.received: int | None = None
        self._old = {}
        if not multiprocess:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Writers:
    """metrics.jsonl, TensorBoard and the progress bar; all on process 0 only."""

    def __init__(self, workdir: Path, active: bool, start_step: int, total: int, progress: bool):
        self.active = active
        self.bar = None
        self.tb = None
        if not active:
            return
        self.path = workdir / "metrics.jsonl"
        _truncate_jsonl(self.path, start_step)  # drop what a killed run logged after its last checkpoint
        self.file = open(self.path, "a", buffering=1)
        try:
            import tensorflow as tf

            self._tf = tf
            self.tb = tf.summary.create_file_writer(str(workdir))
        except ImportError:  # tensorflow-cpu is a dependency; without it, no TensorBoard files
            self.tb = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            _tensorboard_scalars(self._tf, self.tb, record)

    def progress(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.flush()
        if self.bar is not None:
            self.bar.close()


def _tensorboard_scalars(tf, writer, record: dict) -> None:
    # tf.summary.scalar needs the tensorboard package (tensorflow-cpu does not install it); tf.summary.write with
    # the scalars plugin's metadata writes the same event.
    from tensorflow.core.framework import summary_pb2

    md = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    with writer.as_default():
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                tf.summary.write(k, tf.constant(float(v)), step=record["step"], metadata=md)


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (atomic rewrite)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    write_atomic(path, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep)))


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# -- the trainer -------------------------------------------------------------------------------------------------
class Trainer:
    """Everything a run computes with, without its I/O: the model split into graphdef / trainable / frozen, the
    optimizer, the shardings and the jitted train and validation steps. `train()` drives it; tests use it to
    run the very same step."""

    def __init__(self, config: ml_collections.ConfigDict, mesh, model=None, tok_dir=None, origin: str = "given"):
        from clipseg_jax.model.clip import set_attention_implementation

        self.config, self.mesh = config, mesh
        if model is None:
            dtype = st.compute_dtype(config.dtype, jax.default_backend())
            model, tok_dir, origin = st.build_model(config, dtype, st.DTYPES[config.decoder_dtype])
        if config.attention:
            set_attention_implementation(model, config.attention)
        self.tok_dir, self.origin = tok_dir, origin
        self.graphdef, self.params_host, self.frozen_host, self.rest = st.split_model(model, config.freeze_clip)
        self.model_config = model.config.to_dict()
        self.tx, self.schedule = st.make_optimizer(config.optimizer, config.total_steps)
        self.rep = st.replicated(mesh)
        self.batch_sharding = st.batch_sharding(mesh)
        self.param_sh = st.tree_shardings(self.params_host, mesh)
        self.frozen_sh = st.tree_shardings(self.frozen_host, mesh)
        self.opt_sh = st.tree_shardings(jax.eval_shape(self.tx.init, self.params_host), mesh)
        self.state_sh = {"step": self.rep, "params": self.param_sh, "opt_state": self.opt_sh, "rng": self.rep}
        self.frozen = st.put(self.frozen_host, self.frozen_sh)
        # CLIP passes sample by sample on one CPU device when a sample's activations are large (ViT-B/16 at 352:
        # 485 x 768; the whole batch falls out of cache), the whole batch otherwise (a small model: 132 vs 86
        # samples/s batched vs per sample, synthetic_shapes on 2 cores).
        v = self.model_config["vision_config"]
        tokens = (config.data.image_size // v["patch_size"]) ** 2 + 1
        big = tokens * v["hidden_size"] >= 100_000
        auto = 1 if big and mesh.size == 1 and mesh.devices.flat[0].platform == "cpu" else 0
        self.chunk = auto if config.encode_chunk < 0 else config.encode_chunk
        self.recipe = Recipe(with_visual=config.data.with_visual, text_weight_min=config.mix.text_weight_min,
                             text_weight_max=config.mix.text_weight_max, support_render=config.data.support_render,
                             visual_prompt_mode=config.data.visual_prompt_mode,
                             dropout=config.model.decoder_dropout > 0, chunk=self.chunk)
        self.batch_keys = train_keys(self.recipe.with_visual, self.recipe.support_render)
        self._step = jax.jit(make_train_step(self.graphdef, self.rest, self.tx, self.recipe),
                             in_shardings=(self.state_sh, self.frozen_sh, self.batch_sharding),
                             out_shardings=(self.state_sh, self.rep), donate_argnums=0)
        # Validation decodes pair by pair on one CPU device like the Predictor; over several devices a lax.map
        # over the global batch would run their shares one after the other.
        self.pair_chunk = resolve_pair_chunk("auto", mesh.devices.flat[0]) if mesh.size == 1 else None
        eval_step = make_eval_step(self.graphdef, self.rest, self.chunk, self.pair_chunk)
        self._eval = jax.jit(lambda p, f, b, i: (eval_step(p, f, b), i),
                             in_shardings=(self.param_sh, self.frozen_sh, self.batch_sharding, self.batch_sharding),
                             out_shardings=(self.rep, self.rep))
        self._compiled = None
        self.flops_per_device: float | None = None

    def init_state(self) -> dict:
        params = st.put(self.params_host, self.param_sh)
        return {"step": st.put(np.int32(0), self.rep), "params": params,
                "opt_state": jax.jit(self.tx.init, out_shardings=self.opt_sh)(params),
                "rng": st.put(np.asarray(jax.random.key_data(jax.random.key(self.config.seed))), self.rep)}

    def abstract_state(self) -> dict:
        """The state's shapes, dtypes and shardings (the restore target)."""
        host = {"step": np.int32(0), "params": self.params_host,
                "opt_state": jax.eval_shape(self.tx.init, self.params_host), "rng": np.zeros(2, np.uint32)}
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), host, self.state_sh)

    def step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step (the state is donated). Compiled on first use; `flops_per_device` then set."""
        if self._compiled is None:
            lowered = self._step.lower(state, self.frozen, batch)
            self._compiled = lowered.compile()
            self.flops_per_device = self._count_flops(state, batch, lowered)
        return self._compiled(state, self.frozen, batch)

    def _count_flops(self, state, batch, lowered) -> float | None:
        """FLOPs of one step per device: XLA's cost analysis of the step lowered without chunking (a `lax.map`
        body would be counted once, not once per group), divided over the devices. `lowered` is the step as
        compiled: without chunking it is counted as it is (no second trace)."""
        import dataclasses

        if self.recipe.chunk == 0:
            flops = _flops(lowered)
        else:
            plain = make_train_step(self.graphdef, self.rest, self.tx, dataclasses.replace(self.recipe, chunk=0))
            flops = _flops(jax.jit(plain).lower(state, self.frozen, batch))
        return None if flops is None else flops / self.mesh.size

    def evaluate(self, params, source, tokenizer, eval_cfg, threshold: float) -> dict:
        """Validation metrics of `params` on `source` (`FixedThresholdMetrics`, the sample as class)."""
        from clipseg_jax.metrics import FixedThresholdMetrics

        metric = FixedThresholdMetrics()
        for batch, index in eval_batches(source, tokenizer, eval_cfg.text_length, eval_cfg.image_size,
                                         eval_cfg.batch_size, self.batch_sharding, jax.process_index(),
                                         jax.process_count()):
            counts, idx = self._eval(params, self.frozen, batch, index)
            counts, idx = np.asarray(counts), np.asarray(idx)
            keep = idx >= 0
            if keep.any():
                metric.add_counts(counts[keep], idx[keep])
        r = metric.result()
        t = r["thresholds"].index(round(threshold, 6))
        return {"fgiou": r["fgiou_scores"][t], "miou": r["miou_scores"][t], "ap": r["ap"], "threshold": threshold,
                "fgiou_best": r["fgiou_best"], "fgiou_best_t": r["fgiou_best_t"], "miou_best": r["miou_best"],
                "n_samples": r["n_samples"]}

    def host_params(self, params) -> dict:
        """The trainable parameters as host numpy arrays (gathered: every process gets them whole)."""
        return jax.tree.map(np.asarray, jax.jit(lambda p: p, out_shardings=self.rep)(params))

    def model(self, params):
        """The CLIPSeg module with `params` (host arrays) as its trainable part."""
        from flax import nnx

        return nnx.merge(self.graphdef, params, self.frozen_host, self.rest)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (or resume) in `workdir`; returns a summary (final step, validation metrics, paths)."""
    from clipseg_jax.tokenizer import CLIPTokenizer
    from data_pipelines import make_pcplus, train_and_eval_sources

    workdir = Path(workdir).expanduser().absolute()
    init_distributed(config)
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    mesh = st.make_mesh(config.mesh.data, config.mesh.fsdp)
    gb, eb = config.data.batch_size, config.eval_data.batch_size
    for name, b in (("data", gb), ("eval_data", eb)):
        if b % mesh.size or b % pc:
            raise ConfigError(f"config.{name}.batch_size={b} (the global batch) must be divisible by the "
                              f"{mesh.size} devices and the {pc} processes")
    t = config.eval_threshold
    if not 0 < t < 1 or abs(t * 50 - round(t * 50)) > 1e-9:
        raise ConfigError(f"config.eval_threshold={t}: expected one of the metric thresholds 0.02, 0.04, ..., 0.98")

    # Data first: a missing dataset fails before the model is loaded.
    train_src, eval_src = train_and_eval_sources(config.data, config.eval_data)
    trainer = Trainer(config, mesh)
    meta_base = {
        "version": 1, "model_config": trainer.model_config, "freeze_clip": bool(config.freeze_clip),
        "origin": trainer.origin, "frozen_fingerprint": fingerprint(trainer.frozen_host),
        "data": {"seed": config.data.seed, "global_batch": gb, "process_count": pc, "source": config.data.source,
                 "num_tasks": len(train_src)},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(workdir / "checkpoints", config.keep_checkpoints)
    try:
        latest = ckpts.latest_step()
        if latest is None:
            state, start = trainer.init_state(), 0
        else:
            where = ckpts.directory / str(latest)
            _check_resume(ckpts.read_meta(latest), meta_base, where)
            state, _ = ckpts.restore(latest, trainer.abstract_state())
            start = int(state["step"])
            log.info("resumed from %s at step %d", where, start)
        if primary:
            _write_json_atomic(workdir / "config.json", json.loads(to_json(config)))
        tokenizer = CLIPTokenizer.from_pretrained(trainer.tok_dir)
        pipeline = make_pcplus(config.data, train_src, batch_size=gb // pc, process_index=pi, process_count=pc)
        batches = TrainBatches(pipeline, tokenizer, config.data.text_length, trainer.batch_keys,
                               trainer.batch_sharding, gb, start)
        try:
            return _loop(config, workdir, trainer, ckpts, state, start, latest, batches, tokenizer, eval_src,
                         meta_base, primary, pc)
        finally:
            batches.close()
    finally:
        ckpts.close()


def _loop(config, workdir: Path, trainer: Trainer, ckpts: Checkpoints, state, start: int, latest, batches,
          tokenizer, eval_src, meta_base: dict, primary: bool, pc: int) -> dict:
    total, gb = config.total_steps, config.data.batch_size
    writers = _Writers(workdir, primary, start, total, config.progress and primary)
    signals = _Signals(pc > 1)
    summary: dict[str, Any] = {"workdir": str(workdir), "start_step": start}
    pending: list[tuple[int, jax.Array, jax.Array]] = []  # (step, loss, grad norm) not checked yet
    inflight: list[jax.Array] = []
    step, t_mark, step_mark, last_saved = start, None, start, latest
    peak = peak_flops(jax.devices()[0], config.peak_tflops)

    def meta(at: int) -> dict:
        return {**meta_base, "step": at, "data": {**meta_base["data"], "step": at}}

    def checked_losses() -> list[tuple[int, float]]:
        """The losses since the last check, fetched; a non-finite loss or gradient stops training."""
        values = jax.device_get([(loss, gnorm) for _, loss, gnorm in pending])
        steps = [s_ for s_, _, _ in pending]
        pending.clear()
        got = []
        for s_, (loss, gnorm) in zip(steps, values):
            for what, v in (("loss", loss), ("gradient norm", gnorm)):
                if not math.isfinite(float(v)):
                    ckpts.wait()  # a save of an earlier, good step may still be running: let it finish
                    raise TrainingError(
                        f"step {s_}: the {what} is {float(v)}; training stopped, this state was not saved (last good "
                        f"checkpoint: {'none' if last_saved is None else f'step {last_saved}'} in {ckpts.directory})")
            got.append((s_, float(loss)))
        return got

    def evaluate() -> dict:
        return trainer.evaluate(state["params"], eval_src, tokenizer, config.eval_data, config.eval_threshold)

    try:
        while step < total:
            batch = next(batches)
            state, metrics = trainer.step(state, batch)
            step += 1
            pending.append((step, metrics["loss"], metrics["grad_norm"]))
            inflight.append(metrics["loss"])
            if len(inflight) > 2:  # at most two steps queued on the device: bounded memory for their batches
                inflight.pop(0).block_until_ready()
            if t_mark is None:  # throughput counts from the end of the first step (its compilation excluded)
                metrics["loss"].block_until_ready()
                t_mark, step_mark = time.perf_counter(), step
            if step % config.log_every == 0 or step == total:
                losses = checked_losses()
                now = time.perf_counter()
                steps_per_s = (step - step_mark) / (now - t_mark) if step > step_mark else None
                flops = trainer.flops_per_device
                record = {
                    "step": step, "loss": losses[-1][1], "loss_mean": float(np.mean([v for _, v in losses])),
                    "lr": float(trainer.schedule(step - 1)), "grad_norm": float(metrics["grad_norm"]),
                    "samples_per_s": None if steps_per_s is None else steps_per_s * gb,
                    "tflops_per_s_per_device": None if steps_per_s is None or flops is None else flops * steps_per_s / 1e12,
                    "mfu": None if steps_per_s is None or flops is None or peak is None else flops * steps_per_s / peak,
                }
                writers.write(record)
                t_mark, step_mark = now, step
                rate = record["samples_per_s"]
                writers.progress(0, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 samples_s=f"{rate:.1f}" if rate else "-")
            writers.progress(1)
            preempted = signals.received is not None or (pc > 1 and ckpts.reached_preemption(step))
            if step % config.checkpoint_every == 0 or preempted or step == total:
                checked_losses()
                ckpts.save(step, state, meta(step), force=True)
                last_saved = step
            if preempted:
                ckpts.wait()
                log.warning("stopped by a signal at step %d; checkpoint saved, rerun the command to resume", step)
                summary.update(step=step, preempted=True)
                return summary
            if config.eval_every and step % config.eval_every == 0 and step < total:
                writers.write({"step": step, **{f"val/{k}": v for k, v in evaluate().items()}})
        checked_losses()
        if last_saved != step:
            ckpts.save(step, state, meta(step), force=True)
        ckpts.wait()
        final = evaluate()
        writers.write({"step": step, **{f"val/{k}": v for k, v in final.items()}})
        model_dir, params_fp = _export(trainer, state["params"], workdir, primary)
        if primary:
            _write_json_atomic(workdir / "eval_metrics.json", {"step": step, **final})
        summary.update(step=step, eval=final, model=str(model_dir), params_fingerprint=params_fp, preempted=False)
        return summary
    finally:
        signals.restore()
        writers.close()


def _check_resume(meta: dict, base: dict, where: Path) -> None:
    if meta.get("model_config") != base["model_config"]:
        a, b = meta.get("model_config", {}), base["model_config"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConfigError(f"{where}: a checkpoint of another architecture (differs in {', '.join(diff[:6])}); "
                          f"use another --workdir, or remove it to start over")
    if meta.get("freeze_clip") != base["freeze_clip"]:
        raise ConfigError(f"{where}: trained with freeze_clip={meta.get('freeze_clip')}, the config says "
                          f"{base['freeze_clip']}; use another --workdir")
    if meta.get("frozen_fingerprint") != base["frozen_fingerprint"]:
        raise ConfigError(f"{where}: the frozen weights ({base['origin']}) differ from those this checkpoint was "
                          f"trained with ({meta.get('origin')}); use the same init / init_clip to resume")
    d, e = meta.get("data", {}), base["data"]
    for key in ("seed", "global_batch", "num_tasks"):
        if d.get(key) != e[key]:
            raise ConfigError(f"{where}: data.{key}={e[key]} but the checkpoint's data stream had {d.get(key)}; "
                              f"resuming would not continue it (use another --workdir)")
    if d.get("process_count") != e["process_count"]:
        log.warning("%s: resuming with %d processes, the checkpoint was written by %s: each host's data shard "
                    "changes, so the run is no longer the same as an unbroken one", where, e["process_count"],
                    d.get("process_count"))


def _flops(lowered) -> float | None:
    """FLOPs of a lowered or compiled computation (XLA's cost analysis)."""
    try:
        cost = lowered.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001  (not every backend reports costs)
        return None


def _export(trainer: Trainer, params, workdir: Path, primary: bool) -> tuple[Path, str]:
    """WORKDIR/model in the project's checkpoint format (written by process 0); (its path, a fingerprint of the
    trained parameters as this process holds them)."""
    from clipseg_jax.weights import store

    host = trainer.host_params(params)  # collective: every process takes part
    out = workdir / "model"
    if primary:
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an earlier run's export (its training state is in checkpoints/)
        store.save(trainer.model(host), out, tokenizer_dir=trainer.tok_dir)
    return out, fingerprint(host)
