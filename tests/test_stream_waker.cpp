// StreamWaker (inference/stream_waker.h) loses no wake: waiters that block on their targets with
// no timeout each see every change handed to them, however the changes and the waker's thread
// interleave (a target queued twice, a waiter behind by several changes). A lost wake leaves a
// waiter blocked, and the test never ends (CTest's timeout fails it).
#include <gtest/gtest.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "inference/stream_waker.h"

namespace dmc {
namespace {

using inference::StreamWaker;
using inference::WakeTarget;

struct Counter : WakeTarget {
  std::mutex mu;
  int value = 0;
};

TEST(StreamWaker, EveryWaiterSeesEveryChange) {
  constexpr int kTargets = 32, kChanges = 200;
  std::vector<std::shared_ptr<Counter>> counters;
  std::vector<std::thread> waiters;
  // Each change waits for every waiter to have seen the one before, so a waiter is mostly
  // blocked when its next change comes: only a wake moves it on.
  std::mutex ack_mu;
  std::condition_variable ack_cv;
  std::vector<int> acked(kTargets, 0);
  for (int i = 0; i < kTargets; ++i) {
    counters.push_back(std::make_shared<Counter>());
    waiters.emplace_back([c = counters.back(), &ack_mu, &ack_cv, &acked, i] {
      std::unique_lock<std::mutex> lock(c->mu);
      int last = 0;
      while (last < kChanges) {
        c->cv.wait(lock, [&] { return c->value > last; });
        last = c->value;
        std::lock_guard<std::mutex> ack(ack_mu);
        acked[i] = last;
        ack_cv.notify_all();
      }
    });
  }
  {
    StreamWaker waker;
    for (int k = 1; k <= kChanges; ++k) {
      for (const auto& c : counters) {
        {
          std::lock_guard<std::mutex> lock(c->mu);
          c->value = k;
        }
        waker.Wake(c);
        if (k % 50 == 0) waker.Wake(c);  // queued twice: one wake
      }
      std::unique_lock<std::mutex> lock(ack_mu);
      ack_cv.wait(lock, [&] {
        for (int a : acked)
          if (a < k) return false;
        return true;
      });
    }
    for (std::thread& t : waiters) t.join();
  }  // the waker's thread ends with nothing queued
  for (int i = 0; i < kTargets; ++i) EXPECT_EQ(acked[i], kChanges);
}

// Targets queued when the waker is destroyed are still woken.
TEST(StreamWaker, DestroyingItWakesWhatIsQueued) {
  auto c = std::make_shared<Counter>();
  std::thread waiter([c] {
    std::unique_lock<std::mutex> lock(c->mu);
    c->cv.wait(lock, [&] { return c->value == 1; });
  });
  {
    StreamWaker waker;
    {
      std::lock_guard<std::mutex> lock(c->mu);
      c->value = 1;
    }
    waker.Wake(c);
  }
  waiter.join();
  EXPECT_EQ(c->value, 1);
}

}  // namespace
}  // namespace dmc
