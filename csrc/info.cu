// Build information of the extension (no device call: works without a GPU).
#include "common.cuh"

#ifndef ALIGNKERNELS_ARCHS
#define ALIGNKERNELS_ARCHS "unknown"
#endif

namespace alignkernels {

int cuda_runtime_version() { return CUDART_VERSION; }

std::string compiled_archs() { return ALIGNKERNELS_ARCHS; }

}  // namespace alignkernels
