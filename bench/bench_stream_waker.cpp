// What handing a token to a waiting stream costs dmc-serve's engine thread (inference/
// stream_waker.h). N threads each wait on their own target, as the HTTP handlers of N streaming
// requests do; a step hands every one a token (its state changed under its mutex) and wakes it,
// either on the handing thread itself (notify_all, as dmc-serve did) or through a StreamWaker;
// then the step's device work is a sleep, and the next step waits for every waiter to have seen
// its token. Prints the handing thread's µs per token and how long after the step's start the
// last waiter saw its token (the mean over the steps).
//
//   bench_stream_waker [--streams=85,300,790] [--steps=200] [--step_ms=3]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "inference/stream_waker.h"

ABSL_FLAG(std::vector<std::string>, streams, (std::vector<std::string>{"85", "300", "790"}),
          "waiting streams (the rows of a step)");
ABSL_FLAG(int, steps, 200, "steps timed per row");
ABSL_FLAG(int, step_ms, 3, "the device's step, slept between two hand-outs");

namespace {
using Clock = std::chrono::steady_clock;
using dmc::inference::StreamWaker;
using dmc::inference::WakeTarget;

struct Stream : WakeTarget {
  std::mutex mu;
  long tokens = 0, seen = 0;
  bool stop = false;
  std::atomic<int64_t> seen_at_ns{0};  // when the waiter last saw a token
};

int64_t Now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

// Returns {µs per token on the handing thread, ms from a step's start to its last delivery}.
std::pair<double, double> Run(int n, int steps, int step_ms, bool waker_thread) {
  std::vector<std::shared_ptr<Stream>> streams;
  std::vector<std::thread> waiters;
  for (int i = 0; i < n; ++i) {
    streams.push_back(std::make_shared<Stream>());
    waiters.emplace_back([s = streams.back()] {
      std::unique_lock<std::mutex> lock(s->mu);
      while (!s->stop) {
        s->cv.wait(lock, [&] { return s->stop || s->tokens > s->seen; });
        s->seen = s->tokens;
        s->seen_at_ns = Now();
      }
    });
  }
  std::unique_ptr<StreamWaker> waker = waker_thread ? std::make_unique<StreamWaker>() : nullptr;
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // every waiter waiting
  double handing_us = 0, delivered_ms = 0;
  for (int step = 0; step < steps; ++step) {
    const int64_t start = Now();
    for (const auto& s : streams) {
      {
        std::lock_guard<std::mutex> lock(s->mu);
        ++s->tokens;
      }
      if (waker)
        waker->Wake(s);
      else
        s->cv.notify_all();
    }
    handing_us += (Now() - start) * 1e-3;
    std::this_thread::sleep_for(std::chrono::milliseconds(step_ms));
    int64_t last = 0;
    for (const auto& s : streams) {  // every waiter has seen this step's token
      for (;;) {
        {
          std::lock_guard<std::mutex> lock(s->mu);
          if (s->seen == step + 1) break;
        }
        std::this_thread::yield();
      }
      last = std::max<int64_t>(last, s->seen_at_ns);
    }
    delivered_ms += (last - start) * 1e-6;
  }
  waker.reset();
  for (const auto& s : streams) {
    {
      std::lock_guard<std::mutex> lock(s->mu);
      s->stop = true;
    }
    s->cv.notify_all();
  }
  for (std::thread& t : waiters) t.join();
  return {handing_us / (double(steps) * n), delivered_ms / steps};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int steps = absl::GetFlag(FLAGS_steps), step_ms = absl::GetFlag(FLAGS_step_ms);
  std::printf("handing each of N waiting streams a token a step, %d steps of %d ms, %u cores\n\n",
              steps, step_ms, std::thread::hardware_concurrency());
  std::printf("| streams | wakes on | µs per token (handing thread) | ms to the step's last delivery |\n");
  std::printf("| ---: | --- | ---: | ---: |\n");
  for (const std::string& text : absl::GetFlag(FLAGS_streams)) {
    const int n = std::stoi(text);
    for (bool waker : {false, true}) {
      const auto [us, ms] = Run(n, steps, step_ms, waker);
      std::printf("| %d | %s | %.2f | %.2f |\n", n, waker ? "StreamWaker" : "the handing thread",
                  us, ms);
    }
  }
  return 0;
}
