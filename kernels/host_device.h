// DMC_HOST_DEVICE marks a function of a CPU header that the CUDA kernels call too, so that both
// versions share one definition of a rule: __host__ __device__ under nvcc, nothing otherwise.
#pragma once

#if defined(__CUDACC__)
#define DMC_HOST_DEVICE __host__ __device__
#else
#define DMC_HOST_DEVICE
#endif
