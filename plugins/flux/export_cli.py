"""``minfm export diffusers SRC OUT_DIR`` argument parsing (torch is imported only when it runs)."""

from __future__ import annotations

from minfm_core.cli.argtypes import add_allow_pickle_flag


def add_export_command(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert a trained model to another library's format")
    fmt = p.add_subparsers(dest="export_format", metavar="FORMAT")
    d = fmt.add_parser(
        "diffusers",
        help="write a folder that diffusers' FluxTransformer2DModel.from_pretrained loads",
        description="SRC: a run or checkpoint directory, hf://org/name, a .safetensors file of native "
        "(BFL-layout) FLUX weights, or a folder holding model.safetensors (and ema.safetensors) with its recipe.toml.",
    )
    d.add_argument("src", help="run dir, checkpoint dir, hf:// model, weights file or exported folder")
    d.add_argument("out_dir", help="output folder (created; existing files are overwritten)")
    d.add_argument("--flavor", default=None, choices=("flux-debug", "flux-tiny", "flux-dev"), help="FLUX flavor when SRC has no recipe.toml")
    d.add_argument("--ema", action="store_true", help="export ema.safetensors instead of model.safetensors")
    d.add_argument("--dtype", choices=("keep", "bf16", "fp16", "fp32"), default="keep", help="cast the weights")
    add_allow_pickle_flag(d)
    d.set_defaults(func=_run)


def _run(args) -> int:
    import tempfile
    from pathlib import Path

    from minfm_core.checkpoint import export_for_hub, refuse_inside_checkpoint
    from minfm_core.safepath import require_folder_room
    from minfm_core.sources import resolve_source
    from minfm_core.weights import has_weights

    from .export import export_diffusers

    require_folder_room(args.out_dir, "OUT_DIR")
    refuse_inside_checkpoint(Path(args.out_dir), "OUT_DIR", "export")
    src = resolve_source(args.src)
    with tempfile.TemporaryDirectory(prefix="minfm-export-") as tmp:
        if src.is_dir() and not has_weights(src):
            # A run or DCP checkpoint directory: consolidate its weights first.
            src = export_for_hub(src, Path(tmp), allow_pickle=args.allow_pickle_checkpoint)
        out = export_diffusers(src, args.out_dir, flavor=args.flavor, ema=args.ema, dtype=args.dtype, name=args.src)
    print(f"wrote {out}")
    return 0
