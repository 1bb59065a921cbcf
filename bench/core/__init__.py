"""The core: the denoiser contract, the solver contract, per-sample noise, guidance, and sampling itself."""
