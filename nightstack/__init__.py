"""nightstack: calibrate, register and stack nights of sky exposures."""

__version__ = "0.1.0"
