// Wakes the threads that wait on streams, from a thread of its own. dmc-serve's engine thread
// hands every row's token to the HTTP handler streaming it, and waking a waiting thread is a
// system call: made by the engine thread, 8-29 µs a token (bench/bench_stream_waker.cpp, two
// cores), so milliseconds of host time a step at hundreds of rows before the next step could
// start. Wake only queues the target (a lock, well under a microsecond) and the waker's thread
// wakes the queued targets while the next step runs. A target still queued is not queued again,
// so a waiter that fell behind takes everything that arrived in one wake-up.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace dmc::inference {

// What a waiter waits on: its own mutex guards its state; notify_all on cv wakes it.
struct WakeTarget {
  std::condition_variable cv;
  bool wake_queued = false;  // guarded by the StreamWaker's mutex
};

class StreamWaker {
 public:
  StreamWaker();
  // Wakes what is queued, then joins its thread.
  ~StreamWaker();
  StreamWaker(const StreamWaker&) = delete;
  StreamWaker& operator=(const StreamWaker&) = delete;

  // Call after changing the target's state under the waiter's mutex (and releasing it): the
  // waiter is woken soon after, on the waker's thread. The target is kept alive until then.
  void Wake(std::shared_ptr<WakeTarget> target);

 private:
  void Run();

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<WakeTarget>> queued_;
  bool stop_ = false;
  std::thread thread_;  // last: it starts once the rest exists
};

}  // namespace dmc::inference
