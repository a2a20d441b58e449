"""The body of `src/export.py`: a DiT checkpoint (any format `load_dit` reads) to safetensors and/or a
diffusers folder."""

import sys

from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.interop import describe, export_safetensors, load_dit

# The flags of the argparse command line this module had, as src/export.py's key=value options.
OLD_FLAGS = {"--raw": "use_ema=false", "--no-vae": "include_vae=false"}


def export(cfg: DictConfig) -> None:
    """Writes `cfg.safetensors` and/or `cfg.diffusers` from `cfg.ckpt` (see conf/export.yaml)."""
    if not (cfg.safetensors or cfg.diffusers):
        raise ValueError("nothing to write: give safetensors=<file> and/or diffusers=<folder>")
    loaded = load_dit(cfg.ckpt, use_ema=cfg.use_ema)
    print(f"{describe(loaded.model.config)} ({loaded.source_format}, {loaded.weights} weights)")
    if cfg.safetensors:
        print(f"wrote {export_safetensors(loaded, cfg.safetensors)}")
    if cfg.diffusers:
        from ditlab.interop.diffusers_export import export_diffusers  # imports diffusers, slow

        written = export_diffusers(
            loaded, cfg.diffusers, vae=cfg.vae, scheduler=cfg.scheduler, include_vae=cfg.include_vae
        )
        print(f"wrote {written}")


def old_command_line(argv: list[str]) -> None:
    """`python -m ditlab.interop.export --ckpt X ...`, the command line before src/export.py: refused, with
    the same export in src/export.py's key=value syntax."""
    options, args = [], iter(argv)
    for arg in args:
        if arg in OLD_FLAGS:
            options.append(OLD_FLAGS[arg])
        elif arg.startswith("--"):
            key, given, value = arg[2:].partition("=")
            options.append(f"{key.replace('-', '_')}={value if given else next(args, '<value>')}")
        else:
            options.append(arg)
    raise ValueError(
        "python -m ditlab.interop.export is gone; run: python src/export.py "
        + (" ".join(options) or "ckpt=<checkpoint> safetensors=<file> and/or diffusers=<folder>")
        + " (options: conf/export.yaml)"
    )


if __name__ == "__main__":
    run_cli(old_command_line, sys.argv[1:])
