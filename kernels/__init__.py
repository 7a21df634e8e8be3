"""Triton kernels of the QJL compressed decode path, one kernel per module with its launcher.

Each launcher takes and returns plain tensors laid out as the torch reference in ``qjl/`` (the specification)
lays them out; ``qjl.backend`` chooses between the two. ``KERNELS`` names every kernel with its ``launch_config``
(the constexprs the launcher compiles), for ``python -m profiling kernels-compile``.
"""

from . import combine_splits, decode_attention, decode_project, quantize_keys, quantize_values, scores

KERNELS = {
    "quantize_keys": (quantize_keys.quantize_keys_kernel, quantize_keys.launch_config),
    "quantize_values": (quantize_values.quantize_values_kernel, quantize_values.launch_config),
    "scores": (scores.scores_kernel, scores.launch_config),
    "decode_project": (decode_project.project_kernel, decode_project.launch_config),
    "decode_split": (decode_attention.decode_split_kernel, decode_attention.launch_config),
    "combine_splits": (combine_splits.combine_splits_kernel, combine_splits.launch_config),
}
