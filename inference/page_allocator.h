// Fixed-size pages carved out of a byte budget: the memory manager of the paged KV cache.
//
// The budget pays for pages (page_bytes each) and for reservations of other per-sequence state
// (DMC's window ring buffers), so that what the cache reports is everything it holds. Page ids
// are dense, [0, budget / page_bytes), freed ones reused (the last freed first) before new ones,
// so the backing pool only grows as far as the peak use. Running out is an absl error, never a crash;
// freeing a page twice or one never handed out is an error too (the tests count on it).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dmc::inference {

class PageAllocator {
 public:
  PageAllocator(long budget_bytes, long page_bytes);

  // A free page id, or ResourceExhausted naming the budget.
  absl::StatusOr<int32_t> Allocate();
  absl::Status Free(int32_t page);
  // Charges / returns `bytes` of non-page state against the budget.
  absl::Status Reserve(long bytes);
  absl::Status Release(long bytes);

  long budget_bytes() const { return budget_; }
  long page_bytes() const { return page_bytes_; }
  long used_bytes() const { return used_; }
  long peak_bytes() const { return peak_; }
  long free_bytes() const { return budget_ - used_; }
  // Pages that can still be allocated within the budget.
  long free_pages() const { return free_bytes() / page_bytes_; }
  long pages_in_use() const { return pages_in_use_; }
  // One past the highest page id ever handed out: the pool must hold this many pages.
  int32_t high_water() const { return high_water_; }

 private:
  long budget_, page_bytes_;
  long used_ = 0, peak_ = 0, pages_in_use_ = 0;
  int32_t high_water_ = 0;
  std::vector<int32_t> free_list_;  // freed ids, reused before new ones: a stack
  std::vector<bool> in_use_;
};

}  // namespace dmc::inference
