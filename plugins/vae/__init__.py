"""Built-in plugin 'vae': the FLUX autoencoder, Wan 2.1's video VAE and the identity (pixel-space) VAE."""

from minfm_core import hookimpl

from .configs import FluxAEConfig, IdentityVAEConfig, WanVAEConfig


@hookimpl
def register_vaes(register):
    register("flux_ae", "minfm_plugins.vae.flux_ae:build_flux_ae", FluxAEConfig)
    register("wan", "minfm_plugins.vae.wan:build_wan", WanVAEConfig)
    register("identity", "minfm_plugins.vae.identity:build_identity", IdentityVAEConfig)
