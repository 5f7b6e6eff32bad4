"""Data: image readers, dataset specs and presets, splits, caches and simulators."""
