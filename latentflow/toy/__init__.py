"""The 2D lab: small flow matching and diffusion experiments where quality is measured exactly."""
