// Shared runtime helpers of the CUDA backend: device detection, the grow-only scratch buffers.
#include <cstdlib>
#include <string>
#include <vector>

#include "kernels/cuda_check.h"
#include "kernels/cuda_ops.h"

namespace dmc::cuda {

bool device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return n > 0;
}

bool device_is_sm90() {
  static const bool sm90 = [] {
    int dev = 0, major = 0, minor = 0;
    DMC_CUDA_CHECK(cudaGetDevice(&dev));
    DMC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DMC_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    return major == 9 && minor == 0;
  }();
  return sm90;
}

namespace detail {

void* scratch(int slot, size_t bytes) {
  struct Buf {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  static std::vector<Buf> bufs;
  if (slot >= static_cast<int>(bufs.size())) bufs.resize(slot + 1);
  Buf& b = bufs[slot];
  if (bytes > b.bytes) {
    if (b.ptr) {
      DMC_CUDA_CHECK(cudaDeviceSynchronize());  // a kernel may still use the old buffer
      DMC_CUDA_CHECK(cudaFree(b.ptr));
    }
    DMC_CUDA_CHECK(cudaMalloc(&b.ptr, bytes));
    b.bytes = bytes;
  }
  return b.ptr;
}

bool programmatic_launch() {
  static const bool on = [] {
    const char* v = std::getenv("DMC_PDL");
    return device_is_sm90() && !(v != nullptr && std::string(v) == "0");
  }();
  return on;
}

int num_sms() {
  static int n = 0;
  if (n == 0) {
    int dev = 0;
    DMC_CUDA_CHECK(cudaGetDevice(&dev));
    DMC_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  }
  return n;
}

}  // namespace detail
}  // namespace dmc::cuda
