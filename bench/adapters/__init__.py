"""Models from elsewhere into the denoiser contract: diffusers networks, and verified checkpoints."""
