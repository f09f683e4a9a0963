"""Compiler options for XLA:CPU executables: convolutions in XLA's own kernels instead of YNNPACK's.

Measured on the project's 2-core CPU VM (docs/PERFORMANCE.md, 'CPU speed'): jaxlib 0.10.2 hands every 2-D
float32 convolution with more than 16 channels to YNNPACK, whose kernel for the *filter gradient* (the convolution
of the input with the output gradient, a 32x32 or 16x16 window producing a 3x3 output) runs at 9-19 GFLOP per
CPU-second, a fifth of its forward convolutions. XLA's own (Eigen) convolution kernels run the same filter
gradients 1.6-5x faster and the forward and input-gradient convolutions about as fast, so on CPU the WRN-28-2 MPL
step takes about 0.73x the CPU time with every convolution left to XLA. The option only moves convolutions between
kernel libraries: the HLO, the FLOPs and the results (to float32 rounding) are the same.

Written as a code formulation instead (im2col / shifted slices + one matmul for the filter gradient, or the 2-D
convolution as a 3-D one of unit depth, which YNNPACK does not take), the same convolutions measured slower than
either library's kernels, so the formulation is a per-executable compiler option, not a model change. The option
applies only where the computation runs on CPU; on GPU and TPU `compiler_options` is empty.
"""

import functools

import jax

# LibraryFusionType values YNNPACK may take; dots only (without INDIVIDUAL_CONVOLUTION and the default's
# elementwise/reduce fusions around them): see the table in docs/PERFORMANCE.md.
YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
CONVOLUTIONS_IN_XLA = {YNN_FUSION_TYPE: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@functools.cache
def _supported() -> bool:
  """Whether this jaxlib's XLA:CPU knows the option (it is experimental; a jaxlib without it keeps its default)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CONVOLUTIONS_IN_XLA, backend='cpu').lower(1.0).compile()
  except Exception:  # pylint: disable=broad-except  # an unknown option is INVALID_ARGUMENT, raised as several types
    return False
  return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
  """The options for an executable running on `platform` ('cpu', 'gpu', 'tpu'; None: jax's default backend)."""
  platform = platform or jax.default_backend()
  if platform != 'cpu' or not _supported():
    return {}
  return dict(CONVOLUTIONS_IN_XLA)


def compiler_options_for_mesh(mesh) -> dict[str, str]:
  """The options for an executable on `mesh`'s devices (the device of the computation, not the default one)."""
  return compiler_options(mesh.devices.flat[0].platform)
