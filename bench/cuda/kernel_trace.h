// A kernel table without a profiler: CUPTI's activity records (the same ones Nsight Systems
// reads) of every kernel and copy the GPU ran between Start and Stop, CUDA graph nodes included,
// at the program's own speed. Print lists them by total time with their share of the window's
// wall time, and the share of the window in which the GPU ran nothing, by the length of its
// gaps (the device's own between graph nodes, the host's between steps). A kernel launched
// programmatically (kernels/cuda_check.h) is resident, and recorded, from before its
// griddepcontrol.wait returns, so its time includes its wait for the kernel before it: the table
// then says where a step waits, and DMC_PDL=0 gives each kernel's own time (bench/RESULTS.md,
// entry 45).
#pragma once

#include <cstdint>

namespace dmc::bench {

class KernelTrace {
 public:
  void Start();  // begins recording (idempotent while recording)
  void Stop();   // flushes the records and ends the window
  // The window's wall time, the GPU's busy share of it and its idle gaps by length (under 4 µs:
  // between dependent graph nodes; 4–50 µs; longer: the host's work), per `per` where it is
  // given; then a markdown table: kernel (demangled, without namespaces and arguments), calls,
  // total ms, ms per `per` (e.g. per decode step; 0: not printed), share of the window.
  void Print(const char* title, long per) const;
  bool recording() const { return recording_; }

 private:
  bool recording_ = false;
  double window_ns_ = 0;
  uint64_t start_ns_ = 0;
};

}  // namespace dmc::bench
