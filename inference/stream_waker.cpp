#include "inference/stream_waker.h"

#include <utility>

namespace dmc::inference {

StreamWaker::StreamWaker() : thread_([this] { Run(); }) {}

StreamWaker::~StreamWaker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  thread_.join();
}

void StreamWaker::Wake(std::shared_ptr<WakeTarget> target) {
  bool idle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (target->wake_queued) return;
    target->wake_queued = true;
    idle = queued_.empty();
    queued_.push_back(std::move(target));
  }
  if (idle) cv_.notify_one();  // the waker's thread sleeps only when nothing is queued
}

void StreamWaker::Run() {
  std::vector<std::shared_ptr<WakeTarget>> batch;
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || !queued_.empty(); });
    if (queued_.empty()) return;  // stopping, and nothing is left to wake
    batch.swap(queued_);
    for (const auto& target : batch) target->wake_queued = false;
    lock.unlock();
    for (const auto& target : batch) target->cv.notify_all();
    batch.clear();
    lock.lock();
  }
}

}  // namespace dmc::inference
