// Small HDF5 helpers shared by the shard writer and reader: RAII handles, a process-wide lock, and
// conversion of HDF5's error stack into absl::Status.
//
// HDF5 prints its error stack to stderr by default. Every entry point here takes `H5Guard`, which
// turns that printing off for the calling thread (the setting is per thread in thread-safe builds)
// and serialises HDF5 calls (the Debian build is thread-safe, but the guard keeps us correct on a
// non-thread-safe build too). Errors are collected with `H5ErrorText()` and reported with the file
// name by the caller.
#pragma once

#include <hdf5.h>

#include <mutex>
#include <string>

#include "absl/status/status.h"

namespace dmc::data::h5 {

// Holds the process-wide HDF5 lock; disables HDF5's automatic error printing for this thread.
class H5Guard {
 public:
  H5Guard();
  H5Guard(const H5Guard&) = delete;
  H5Guard& operator=(const H5Guard&) = delete;

 private:
  std::unique_lock<std::recursive_mutex> lock_;
};

// The current thread's HDF5 error stack as one line (innermost cause last), then cleared.
// Empty when the stack is empty.
std::string H5ErrorText();

// absl error "<file>: <what>[ (HDF5: <stack>)]", the stack taken from H5ErrorText().
absl::Status H5Error(absl::StatusCode code, const std::string& file, const std::string& what);

// Owning hid_t with the right close function.
class Handle {
 public:
  enum Kind { kFile, kDataset, kDataspace, kAttribute, kPlist, kType };
  Handle() = default;
  Handle(hid_t id, Kind kind) : id_(id), kind_(kind) {}
  ~Handle() { Reset(); }
  Handle(Handle&& o) noexcept : id_(o.id_), kind_(o.kind_) { o.id_ = -1; }
  Handle& operator=(Handle&& o) noexcept {
    if (this != &o) {
      Reset();
      id_ = o.id_;
      kind_ = o.kind_;
      o.id_ = -1;
    }
    return *this;
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now; returns the close's result (negative on failure).
  herr_t Close();
  void Reset() { (void)Close(); }

 private:
  hid_t id_ = -1;
  Kind kind_ = kFile;
};

}  // namespace dmc::data::h5
