#include "inference/page_allocator.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace dmc::inference {

PageAllocator::PageAllocator(long budget_bytes, long page_bytes)
    : budget_(std::max(0L, budget_bytes)), page_bytes_(std::max(1L, page_bytes)) {}

absl::StatusOr<int32_t> PageAllocator::Allocate() {
  if (free_bytes() < page_bytes_)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes exhausted: %d bytes in use (%d pages of %d bytes), a page "
        "needs %d",
        budget_, used_, pages_in_use_, page_bytes_, page_bytes_));
  int32_t page;
  if (!free_list_.empty()) {
    // The last freed first, in O(1) (a finished sequence returns thousands of pages at once);
    // the pool grows past its peak use only when no freed page is left, whatever the order.
    page = free_list_.back();
    free_list_.pop_back();
  } else {
    page = high_water_++;
    in_use_.push_back(false);
  }
  in_use_[page] = true;
  ++pages_in_use_;
  used_ += page_bytes_;
  peak_ = std::max(peak_, used_);
  return page;
}

absl::Status PageAllocator::Free(int32_t page) {
  if (page < 0 || page >= high_water_)
    return absl::InvalidArgumentError(
        absl::StrFormat("free of page %d, which was never allocated (%d pages exist)", page,
                        high_water_));
  if (!in_use_[page])
    return absl::FailedPreconditionError(absl::StrFormat("double free of page %d", page));
  in_use_[page] = false;
  free_list_.push_back(page);
  --pages_in_use_;
  used_ -= page_bytes_;
  return absl::OkStatus();
}

absl::Status PageAllocator::Reserve(long bytes) {
  if (bytes > free_bytes())
    return absl::ResourceExhaustedError(absl::StrFormat(
        "KV cache budget of %d bytes exhausted: %d bytes in use, %d more needed", budget_, used_,
        bytes));
  used_ += bytes;
  peak_ = std::max(peak_, used_);
  return absl::OkStatus();
}

absl::Status PageAllocator::Release(long bytes) {
  if (bytes > used_ - pages_in_use_ * page_bytes_)
    return absl::FailedPreconditionError(
        absl::StrFormat("release of %d bytes exceeds the %d bytes reserved", bytes,
                        used_ - pages_in_use_ * page_bytes_));
  used_ -= bytes;
  return absl::OkStatus();
}

}  // namespace dmc::inference
