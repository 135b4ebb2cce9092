#include "data/hdf5_util.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dmc::data::h5 {
namespace {

std::recursive_mutex& GlobalMutex() {
  static std::recursive_mutex* m = new std::recursive_mutex;
  return *m;
}

herr_t CollectError(unsigned n, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  if (err->desc != nullptr && err->desc[0] != '\0') {
    std::string s = err->desc;
    if (out->empty() || out->back() != s) out->push_back(std::move(s));
  }
  return 0;
}

}  // namespace

H5Guard::H5Guard() : lock_(GlobalMutex()) {
  thread_local bool printing_off = false;
  if (!printing_off) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    printing_off = true;
  }
}

std::string H5ErrorText() {
  std::vector<std::string> parts;
  // Walk downward: outermost API call first, innermost cause last.
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, CollectError, &parts);
  H5Eclear2(H5E_DEFAULT);
  return absl::StrJoin(parts, "; ");
}

absl::Status H5Error(absl::StatusCode code, const std::string& file, const std::string& what) {
  std::string stack = H5ErrorText();
  std::string msg = absl::StrCat(file, ": ", what);
  if (!stack.empty()) absl::StrAppend(&msg, " (HDF5: ", stack, ")");
  return absl::Status(code, msg);
}

herr_t Handle::Close() {
  if (id_ < 0) return 0;
  herr_t r = 0;
  switch (kind_) {
    case kFile:
      r = H5Fclose(id_);
      break;
    case kDataset:
      r = H5Dclose(id_);
      break;
    case kDataspace:
      r = H5Sclose(id_);
      break;
    case kAttribute:
      r = H5Aclose(id_);
      break;
    case kPlist:
      r = H5Pclose(id_);
      break;
    case kType:
      r = H5Tclose(id_);
      break;
  }
  id_ = -1;
  return r;
}

}  // namespace dmc::data::h5
