"""Train-step throughput, clipseg-jax vs the PyTorch reference step, same weights, same batch, same machine, one run.

Both sides do the original's step (spec §3.2) on the same uint8 batch: the frozen CLIP text tower on the prompts,
the frozen vision tower on the rendered supports (projected CLS) and on the queries, the text/visual mix with the
same weights, the decoder forward and backward, BCE-with-logits, one AdamW + cosine step.
- PyTorch: `transformers.CLIPSegForImageSegmentation`, CLIP `requires_grad_(False)`, the CLIP forwards under
  `torch.no_grad()`, `torch.optim.AdamW` + `CosineAnnealingLR` (autocast bf16 with --dtype bfloat16 on GPU).
- Ours: `clipseg_jax.train.loop.Trainer.step` (the trainer's jitted step; towers in --dtype, decoder float32).
Prints median seconds per step, samples/s and the ratio ours / PyTorch; with --text-only, the recipe without
visual supports; with --measure-text, what share of our step the text tower takes (is caching its embeddings
worth it?).

    python benchmarks/bench_train.py                                  # CPU, rd64 architecture, batch 4
    python benchmarks/bench_train.py --device gpu --dtype bfloat16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_inference import timeit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="rd64", choices=("rd64", "rd64-refined", "rd16"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=352)
    ap.add_argument("--text-length", type=int, default=77)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--text-only", action="store_true", help="the recipe without visual supports")
    ap.add_argument("--measure-text", action="store_true",
                    help="also time our step with the text embeddings given (no text tower)")
    ap.add_argument("--encode-chunk", type=int, default=-1, help="config.encode_chunk (-1: the trainer's auto rule)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from tiny_models import make_model, reference_config
    from transformers import CLIPSegForImageSegmentation

    from clipseg_jax.config import CLIPSegConfig
    from clipseg_jax.prompts import IMAGENET_MEAN, IMAGENET_STD
    from clipseg_jax.tokenizer import CLIPTokenizer
    from clipseg_jax.train import load_config
    from clipseg_jax.train.loop import Trainer
    from clipseg_jax.train.state import DTYPES, make_mesh
    from clipseg_jax.weights.hf import model_from_state_dict

    torch.set_num_threads(args.torch_threads)
    tdev = "cuda" if args.device == "gpu" else "cpu"
    b, s = args.batch, args.size
    hf_cfg = reference_config(args.config)
    ref = make_model(hf_cfg, decoder_scale=1.0)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

    # Ours: the trainer's step on a Trainer built around these weights.
    overrides = [f"--config.data.batch_size={b}", f"--config.data.image_size={s}", "--config.total_steps=1000",
                 f"--config.dtype={args.dtype}", "--config.model.decoder_dropout=0.0",
                 f"--config.data.with_visual={not args.text_only}", f"--config.encode_chunk={args.encode_chunk}"]
    config = load_config(ROOT / "configs" / "rd64_uni.py", overrides)
    model = model_from_state_dict(sd, CLIPSegConfig.from_dict(hf_cfg.to_dict()), DTYPES[args.dtype],
                                  decoder_dtype=jnp.float32)
    trainer = Trainer(config, make_mesh(1, 1, jax.devices()[:1]), model=model)

    rng = np.random.RandomState(0)
    prompts = ["a photo of a red umbrella.", "a cropped photo of a cat.", "an image of a small blue car.",
               "a photo of the tree."] * (b // 4 + 1)
    ids, attn = CLIPTokenizer.from_pretrained(None)(prompts[:b], length=args.text_length)
    batch = {"image": rng.randint(0, 256, (b, s, s, 3)).astype(np.uint8),
             "mask": (rng.rand(b, s, s) < 0.3).astype(np.uint8),
             "input_ids": ids, "attention_mask": attn,
             "support_image": rng.randint(0, 256, (b, s, s, 3)).astype(np.uint8),
             "support_valid": np.arange(b) % 5 != 4}
    dev_batch = {k: jnp.asarray(v) for k, v in batch.items() if k in trainer.batch_keys}
    holder = {"state": trainer.init_state()}

    def ours():
        holder["state"], m = trainer.step(holder["state"], dev_batch)
        m["loss"].block_until_ready()

    t_ours = timeit(ours, args.warmup, args.iters)
    results = {"ours_s": statistics.median(t_ours)}

    if args.measure_text:
        # The same step with the text tower's output given: its share of the step is what caching would save.
        from flax import nnx

        from clipseg_jax.train.step import loss_fn, step_keys

        tower = jax.jit(lambda f, r, i, a: nnx.merge(trainer.graphdef, trainer.params_host, f, r)
                        .get_text_features(i, a))
        emb = tower(trainer.frozen, trainer.rest, dev_batch["input_ids"], dev_batch["attention_mask"])
        emb.block_until_ready()

        def text_only_fn():
            tower(trainer.frozen, trainer.rest, dev_batch["input_ids"], dev_batch["attention_mask"]).block_until_ready()

        results["text_tower_s"] = statistics.median(timeit(text_only_fn, 1, args.iters))

    if not args.skip_torch:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32)

        def norm(u8):
            x = torch.from_numpy(u8).to(tdev).float() / 255.0
            return ((x - mean.to(tdev)) / std.to(tdev)).permute(0, 3, 1, 2).contiguous()

        ref = ref.to(tdev).train()
        ref.clip.requires_grad_(False)
        params = [p for n, p in ref.named_parameters() if n.startswith("decoder.")]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000, eta_min=1e-4)
        tids = torch.from_numpy(ids).long().to(tdev)
        tattn = torch.from_numpy(attn).to(tdev)
        valid = torch.from_numpy(batch["support_valid"]).to(tdev)
        target = torch.from_numpy(batch["mask"]).to(tdev).float()
        autocast = torch.autocast(tdev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

        def theirs():
            with autocast:
                with torch.no_grad():
                    cond = ref.clip.get_text_features(input_ids=tids, attention_mask=tattn)
                    cond = getattr(cond, "pooler_output", cond)
                    if not args.text_only:
                        vis = ref.clip.get_image_features(pixel_values=norm(batch["support_image"]))
                        vis = getattr(vis, "pooler_output", vis)
                        w = torch.rand(b, device=tdev) * 0.5
                        w = torch.where(valid, w, torch.ones_like(w))[:, None]
                        cond = w * cond + (1 - w) * vis
                logits = ref(pixel_values=norm(batch["image"]), conditional_embeddings=cond).logits
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if tdev == "cuda":
                torch.cuda.synchronize()

        results["torch_s"] = statistics.median(timeit(theirs, args.warmup, args.iters))

    dev = jax.devices()[0]
    print(f"{args.config} batch {b} at {s}px, text {args.text_length} tokens, "
          f"{'text only' if args.text_only else 'text + visual supports'}, {args.dtype}, device {dev.device_kind} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), jax {jax.__version__}, "
          f"torch {torch.__version__}, encode_chunk {trainer.chunk}")
    line = f"ours {results['ours_s']:.3f} s/step = {b / results['ours_s']:.2f} samples/s"
    if "torch_s" in results:
        line += (f"; PyTorch {results['torch_s']:.3f} s/step = {b / results['torch_s']:.2f} samples/s; "
                 f"ratio ours/PyTorch {results['torch_s'] / results['ours_s']:.2f}x")
    print(line)
    if trainer.flops_per_device:
        print(f"our step: {trainer.flops_per_device / 1e9:.1f} GFLOP (XLA cost analysis), "
              f"{trainer.flops_per_device / results['ours_s'] / 1e9:.1f} GFLOP/s")
    if "text_tower_s" in results:
        print(f"text tower alone: {results['text_tower_s']:.3f} s = {results['text_tower_s'] / results['ours_s']:.1%} "
              f"of our step (the most caching its embeddings could save)")
    if args.json:
        results.update(vars(args))
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
