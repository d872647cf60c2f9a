"""Pure array functions (orientation, resampling, intensity, crop/pad): no file I/O."""
