"""The body of `src/export.py`: a DiT checkpoint (any format `load_dit` reads) to safetensors and/or a
diffusers folder."""

from omegaconf import DictConfig

from ditlab.interop import describe, export_safetensors, load_dit


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
