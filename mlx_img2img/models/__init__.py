"""MLX modules for the Stable Diffusion components, built from each checkpoint's own config.json.

Module attribute names follow diffusers' parameter names, so a checkpoint's keys load without renaming.
All convolutions work on NHWC arrays (MLX's layout).
"""
