"""Export a DiT checkpoint (any format `load_dit` reads) to safetensors and/or a diffusers folder.

python -m ditlab.interop.export --ckpt last.ckpt --safetensors dit.safetensors
python -m ditlab.interop.export --ckpt DiT-XL-2-256x256.pt --diffusers dit-xl-2-256 --vae path/to/sd-vae-ft-ema
python -m ditlab.interop.export --ckpt DiT-XL-2-256x256.pt --diffusers dit-xl-2-256 --no-vae   # offline
"""

import argparse

from ditlab.cli import run_cli
from ditlab.interop.checkpoints import describe, export_safetensors, load_dit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint file, released name, or diffusers folder")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--safetensors", help="write the weights and the ditlab header to this .safetensors")
    parser.add_argument("--diffusers", help="write a diffusers DiTPipeline (or transformer) folder here")
    parser.add_argument("--vae", help="VAE folder or hub name for the pipeline (default: the checkpoint's)")
    parser.add_argument(
        "--no-vae", action="store_true", help="export the transformer and scheduler alone (no VAE at hand)"
    )
    parser.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm_solver"))
    args = parser.parse_args(argv)
    if not (args.safetensors or args.diffusers):
        parser.error("give --safetensors and/or --diffusers")
    run_cli(export, args)


def export(args: argparse.Namespace) -> None:
    loaded = load_dit(args.ckpt, use_ema=not args.raw)
    print(f"{describe(loaded.model.config)} ({loaded.source_format}, {loaded.weights} weights)")
    if args.safetensors:
        print(f"wrote {export_safetensors(loaded, args.safetensors)}")
    if args.diffusers:
        from ditlab.interop.diffusers_export import export_diffusers  # imports diffusers, slow

        written = export_diffusers(
            loaded, args.diffusers, vae=args.vae, scheduler=args.scheduler, include_vae=not args.no_vae
        )
        print(f"wrote {written}")


if __name__ == "__main__":
    main()
