"""clipseg-jax command line: parse arguments and dispatch to the library.

    python main.py predict --checkpoint CIDAS/clipseg-rd64-refined --image cats.jpg --prompt "a cat" --out out/
    python main.py convert --checkpoint CIDAS/clipseg-rd64-refined --out ckpt/            (our orbax format)
    python main.py convert --checkpoint ckpt/ --to-hf --out hf_dir/                        (back to transformers)
    python main.py convert --original-decoder rd64-uni.pth --clip-weights ViT-B-16.pt --out ckpt/
    python main.py compare --checkpoint hf_dir/                                            (ours vs PyTorch)
    python main.py eval --checkpoint ckpt/ --dataset phrasecut --data-dir DIR --output metrics.json
    python main.py train --config configs/rd64_uni.py --workdir runs/rd64 [--config.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main.py", description="CLIPSeg in JAX/Flax")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="segment images with text and/or visual prompts; writes mask + overlay PNGs",
                        description="Images are predicted in batches and written as they finish; rerunning the same "
                                    "command skips images whose outputs exist. Repeated flags add up.")
    pr.add_argument("--checkpoint", required=True, help="HF dir, hub id, or our checkpoint dir")
    pr.add_argument("--image", nargs="+", action="extend", required=True, metavar="PATH",
                    help="image files, folders (searched recursively) or glob patterns")
    pr.add_argument("--prompt", nargs="+", action="extend", default=[], metavar="TEXT")
    pr.add_argument("--visual-prompt", nargs="+", action="extend", default=[], metavar="IMG:MASK",
                    help="an example image and its object mask (non-zero = object)")
    pr.add_argument("--visual-prompt-mode", default="crop_blur_highlight352")
    pr.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: sub-folders of the inputs kept, prompt names in DIR/prompts.json")
    pr.add_argument("--threshold", type=float, default=0.5, help="mask = probability > threshold, in [0, 1]")
    pr.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    pr.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per prediction step")
    pr.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    pr.add_argument("--save-probs", nargs="?", const="png", choices=("png", "npy"), default=None,
                    help="also write the probabilities: 16-bit PNG (default) or float32 .npy")
    pr.add_argument("--no-overlay", action="store_true", help="write masks only")

    cv = sub.add_parser("convert", help="convert weights to our format (orbax) or back to an HF directory")
    cv.add_argument("--checkpoint", help="HF dir, hub id, or our checkpoint dir")
    cv.add_argument("--original-decoder", metavar="PTH", help="timojl/clipseg decoder weights (rd64-uni.pth, ...)")
    cv.add_argument("--clip-weights", metavar="PT", help="OpenAI CLIP ViT-B/16 state dict, with --original-decoder")
    cv.add_argument("--extract-layers", type=int, nargs="+", help="override for original weights (default 3 6 9)")
    cv.add_argument("--to-hf", action="store_true",
                    help="write an HF directory (config.json + model.safetensors + the processor's files)")
    cv.add_argument("--allow-torchscript", action="store_true",
                    help="read TorchScript archives (OpenAI's ViT-B-16.pt); this runs code from the file: trust it")
    cv.add_argument("--out", required=True, metavar="DIR")

    cp = sub.add_parser("compare", help="run PyTorch (transformers) and JAX on the same inputs; print max |Δ|")
    cp.add_argument("--checkpoint", required=True)
    cp.add_argument("--image", nargs="*", default=[], metavar="PATH")
    cp.add_argument("--prompt", nargs="*", default=[], metavar="TEXT")
    cp.add_argument("--size", type=int, default=352)

    ev = sub.add_parser("eval", help="PhraseCut / Pascal-5i one-shot / Pascal zero-shot evaluation")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--dataset", required=True, choices=("phrasecut", "pascal5i", "pascal_zs"))
    ev.add_argument("--data-dir", required=True)
    ev.add_argument("--fold", type=int, default=0, help="Pascal-5i fold 0-3, or -1 for all four and their mean")
    ev.add_argument("--split", default="test",
                    help="PhraseCut split (test, val, miniv, train; joined ones like val_miniv); Pascal: val")
    ev.add_argument("--support", choices=("visual", "text"), default="visual",
                    help="Pascal-5i support: a rendered example image, or the text 'a photo of a {name}.'")
    ev.add_argument("--output", default=None, metavar="metrics.json")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")

    tr = sub.add_parser("train", help="train (or resume) CLIPSeg; overrides: --config.key=value",
                        epilog="e.g. --config.data.batch_size=32 --config.mesh.fsdp=2 --config.total_steps=1000")
    tr.add_argument("--config", required=True, metavar="configs/NAME.py")
    tr.add_argument("--workdir", required=True, metavar="DIR",
                    help="checkpoints, metrics.jsonl, TensorBoard events, the trained model/; rerun to resume")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `--config.key=value` overrides belong to the train config, not to argparse.
    overrides = [a for a in argv if a.startswith(("--config.", "-config."))]
    args = build_parser().parse_args([a for a in argv if a not in overrides])
    if overrides and args.command != "train":
        print(f"error: {overrides[0]}: config overrides are for the train command", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.command == "train":
            from clipseg_jax.commands import run_train

            return run_train(args.config, overrides, args.workdir)
        if args.command == "predict":
            from clipseg_jax.commands import run_predict

            s = run_predict(args.checkpoint, args.image, args.prompt, args.visual_prompt, args.out, args.dtype,
                            args.threshold, args.visual_prompt_mode, args.batch_size, args.overwrite,
                            args.save_probs, args.no_overlay)
            skipped = f"; {s.skipped} images skipped, their outputs exist (--overwrite to redo)" if s.skipped else ""
            print(f"wrote {s.files} files for {s.done} images to {args.out}{skipped}")
            if s.interrupted:
                print(f"interrupted ({signal.Signals(s.interrupted).name}): rerun the same command to do the rest",
                      file=sys.stderr)
                return 128 + s.interrupted
            if s.failed:
                for msg in s.failed:
                    print(f"skipped {msg}", file=sys.stderr)
                print(f"error: {len(s.failed)} images could not be read (listed above)", file=sys.stderr)
                return 1
            return 0
        if args.command == "convert":
            from clipseg_jax.commands import run_convert

            out = run_convert(args.checkpoint, args.out, args.to_hf, args.original_decoder, args.clip_weights,
                              args.extract_layers, args.allow_torchscript)
            print(f"wrote {out}")
            return 0
        if args.command == "compare":
            from clipseg_jax.commands import run_compare

            return 0 if run_compare(args.checkpoint, args.image, args.prompt, args.size) else 1
        if args.command == "eval":
            from clipseg_jax.evaluate import main_eval

            return main_eval(args)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
