"""Built-in plugin 'vae': the FLUX autoencoder and the identity (pixel-space) VAE."""

from minfm_core import hookimpl

from .configs import FluxAEConfig, IdentityVAEConfig


@hookimpl
def register_vaes(register):
    register("flux_ae", "minfm_plugins.vae.flux_ae:build_flux_ae", FluxAEConfig)
    register("identity", "minfm_plugins.vae.identity:build_identity", IdentityVAEConfig)
