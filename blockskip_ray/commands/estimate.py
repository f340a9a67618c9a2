"""`blockskip estimate`: full-scale training memory and TFLOPs per step, traced on fake tensors (no weights)."""
from __future__ import annotations

import argparse
import json

from .train import parse_skip

_skip = parse_skip  # one --skip parser for every command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="peak training memory and TFLOPs of one step at full scale, without weights",
        description="Trace one real training step of the trainer (the code path of `blockskip train`) on fake "
                    "tensors at full size: only the kept blocks are built, frozen weights bf16, LoRA fp32, AdamW, "
                    "bf16 autocast, as on a GPU. Prints the peak memory with its breakdown and the TFLOPs per step.",
    )
    p.add_argument("--model", required=True, help="flux-dev, flux-schnell, sana-1600m, sana-600m (or a tiny "
                   "config name), or a local diffusers directory (only its config files are read)")
    p.add_argument("--resolution", type=int, required=True, help="training resolution in pixels (s_min, or the "
                   "fixed size of --mode lora); a multiple of 16 for FLUX, 32 for SANA")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip-ratio", type=float, default=None, help="fraction of blocks to skip, in [0, 1); "
                   "split by the default rule (k = round(ratio*N), extra block at the front). Default 0.3")
    g.add_argument("--skip", type=_skip, default=None, metavar="N,M", help="skip the first N and last M blocks")
    p.add_argument("--mode", default="blockskip", choices=["lora", "resize", "naive-skip", "blockskip"],
                   help="training mode; lora trains every block (no skip)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-targets", default="attn", choices=["attn", "attn+ff"],
                   help="LoRA on the attention projections, or also on the feed-forward layers (default attn)")
    p.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    p.add_argument("--text-tokens", type=int, default=512, help="prompt length in tokens (default 512, the "
                   "trainer's max_text_tokens)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint every kept block")
    p.add_argument("--target", default="cuda", choices=["cuda", "cpu"], help="which run to model: cuda "
                   "(bf16 weights + autocast, default) or the trainer's CPU run (fp32)")
    p.add_argument("--subjects", type=int, default=None, metavar="K", help="also model a packed step of K "
                   "subjects sharing one copy of the frozen weights (traces batch 1 and 2; see plan_cost/packed.py)")
    p.add_argument("--fit-gb", type=float, default=None, metavar="GB", help="with --subjects: how many subjects "
                   "fit a GPU of GB (1e9 bytes) today (one process each) and packed")
    p.add_argument("--reserve-gib", type=float, default=1.0, help="with --fit-gb: memory per process for the "
                   "CUDA context and fragmentation (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..plan_cost.estimate import EstimateSpec, estimate  # here, not at the top: keeps `--help` fast

    spec = EstimateSpec(
        model=args.model, resolution=args.resolution, skip=args.skip, skip_ratio=args.skip_ratio, mode=args.mode,
        rank=args.rank, lora_targets=args.lora_targets, batch_size=args.batch_size, text_tokens=args.text_tokens,
        gradient_checkpointing=args.gradient_checkpointing, target=args.target)
    if args.subjects is None:
        if args.fit_gb is not None:
            raise ValueError("--fit-gb needs --subjects K")
        result = estimate(spec)
        print(json.dumps(result, indent=1) if args.json else format_table(result))
        return 0
    from ..plan_cost.packed import estimate_packed, format_packed

    result = estimate_packed(spec, args.subjects, args.fit_gb, args.reserve_gib)
    print(json.dumps(result, indent=1) if args.json else "\n".join([format_table(result), *format_packed(result)]))
    return 0


def format_table(r: dict) -> str:
    lines = [
        f"model {r['model']} ({r['family']}), mode {r['mode']}, {r['resolution']}x{r['resolution']}, "
        f"skip n={r['skip'][0]} m={r['skip'][1]} (blocks {r['kept_blocks'][0]}..{r['kept_blocks'][1]} of "
        f"{r['num_blocks']} kept), rank {r['rank']} ({r['lora_targets']}), batch {r['batch_size']}, text {r['text_tokens']} tokens, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}, modeled run: {r['target']}",
    ]
    # tiny configs are MiB-sized: print them in MiB rather than as a column of 0.00 GiB
    unit, scale = ("GiB", 1) if r["peak_memory_gib"] >= 1 else ("MiB", 1024)
    lines.append(f"{'peak memory':<22}{r['peak_memory_gib'] * scale:>10.2f} {unit}")
    lines += [f"  {k:<20}{v * scale:>10.2f} {unit}" for k, v in r["breakdown_gib"].items()]
    lines += [f"{'TFLOPs per step':<22}{r['tflops_per_step']:>10.4g}  (forward {r['tflops_forward']:.4g})",
              f"{'trainable params':<22}{r['trainable_params']:>10,d}",
              f"(traced in {r['trace_seconds']:.1f} s)"]
    return "\n".join(lines)
