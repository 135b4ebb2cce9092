#include "data/shard.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmc::data {
namespace {

using h5::H5Error;
using h5::H5ErrorText;
using h5::H5Guard;
using h5::Handle;

constexpr char kFormat[] = "dmc-shard";
constexpr int64_t kFormatVersion = 2;  // 2: Fletcher-32 checksums on the token chunks

absl::Status WriteStringAttr(hid_t obj, const char* name, const std::string& value, const std::string& file) {
  Handle type(H5Tcopy(H5T_C_S1), Handle::kType);
  H5Tset_size(type.get(), value.empty() ? 1 : value.size());
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  Handle space(H5Screate(H5S_SCALAR), Handle::kDataspace);
  Handle attr(H5Acreate2(obj, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), Handle::kAttribute);
  if (!attr.valid())
    return H5Error(absl::StatusCode::kInternal, file, absl::StrCat("cannot create attribute ", name));
  std::string buf = value.empty() ? std::string(1, '\0') : value;
  if (H5Awrite(attr.get(), type.get(), buf.data()) < 0)
    return H5Error(absl::StatusCode::kInternal, file, absl::StrCat("cannot write attribute ", name));
  return absl::OkStatus();
}

absl::Status WriteInt64Attr(hid_t obj, const char* name, int64_t value, const std::string& file) {
  Handle space(H5Screate(H5S_SCALAR), Handle::kDataspace);
  Handle attr(H5Acreate2(obj, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
              Handle::kAttribute);
  if (!attr.valid() || H5Awrite(attr.get(), H5T_NATIVE_INT64, &value) < 0)
    return H5Error(absl::StatusCode::kInternal, file, absl::StrCat("cannot write attribute ", name));
  return absl::OkStatus();
}

absl::StatusOr<Handle> OpenAttr(hid_t obj, const char* name, const std::string& file) {
  htri_t exists = H5Aexists(obj, name);
  if (exists <= 0) {
    H5ErrorText();  // clear
    return absl::DataLossError(absl::StrCat(file, ": attribute '", name, "' is missing"));
  }
  Handle attr(H5Aopen(obj, name, H5P_DEFAULT), Handle::kAttribute);
  if (!attr.valid())
    return H5Error(absl::StatusCode::kDataLoss, file, absl::StrCat("cannot open attribute '", name, "'"));
  return attr;
}

absl::StatusOr<std::string> ReadStringAttr(hid_t obj, const char* name, const std::string& file) {
  auto attr = OpenAttr(obj, name, file);
  if (!attr.ok()) return attr.status();
  Handle type(H5Aget_type(attr->get()), Handle::kType);
  if (!type.valid() || H5Tget_class(type.get()) != H5T_STRING)
    return absl::DataLossError(absl::StrCat(file, ": attribute '", name, "' is not a string"));
  std::string out;
  if (H5Tis_variable_str(type.get()) > 0) {
    Handle mem(H5Tcopy(H5T_C_S1), Handle::kType);
    H5Tset_size(mem.get(), H5T_VARIABLE);
    char* s = nullptr;
    if (H5Aread(attr->get(), mem.get(), &s) < 0)
      return H5Error(absl::StatusCode::kDataLoss, file, absl::StrCat("cannot read attribute '", name, "'"));
    if (s != nullptr) {
      out = s;
      H5free_memory(s);
    }
  } else {
    size_t n = H5Tget_size(type.get());
    std::string buf(n, '\0');
    if (H5Aread(attr->get(), type.get(), buf.data()) < 0)
      return H5Error(absl::StatusCode::kDataLoss, file, absl::StrCat("cannot read attribute '", name, "'"));
    out = buf.substr(0, buf.find('\0'));
  }
  return out;
}

absl::StatusOr<int64_t> ReadInt64Attr(hid_t obj, const char* name, const std::string& file) {
  auto attr = OpenAttr(obj, name, file);
  if (!attr.ok()) return attr.status();
  Handle type(H5Aget_type(attr->get()), Handle::kType);
  if (!type.valid() || H5Tget_class(type.get()) != H5T_INTEGER)
    return absl::DataLossError(absl::StrCat(file, ": attribute '", name, "' is not an integer"));
  int64_t v = 0;
  if (H5Aread(attr->get(), H5T_NATIVE_INT64, &v) < 0)
    return H5Error(absl::StatusCode::kDataLoss, file, absl::StrCat("cannot read attribute '", name, "'"));
  return v;
}

// Opens a 1-D unsigned integer dataset of the given byte width; returns it and its length.
absl::StatusOr<Handle> Open1D(hid_t file, const char* name, size_t width, hid_t dapl, const std::string& path,
                              int64_t* length) {
  htri_t exists = H5Lexists(file, name, H5P_DEFAULT);
  if (exists <= 0) {
    H5ErrorText();
    return absl::DataLossError(absl::StrCat(path, ": dataset '", name, "' is missing"));
  }
  Handle ds(H5Dopen2(file, name, dapl), Handle::kDataset);
  if (!ds.valid())
    return H5Error(absl::StatusCode::kDataLoss, path, absl::StrCat("cannot open dataset '", name, "'"));
  Handle type(H5Dget_type(ds.get()), Handle::kType);
  if (!type.valid() || H5Tget_class(type.get()) != H5T_INTEGER || H5Tget_size(type.get()) != width ||
      H5Tget_sign(type.get()) != H5T_SGN_NONE)
    return absl::DataLossError(
        absl::StrFormat("%s: dataset '%s' must be uint%d", path, name, static_cast<int>(width * 8)));
  Handle space(H5Dget_space(ds.get()), Handle::kDataspace);
  if (!space.valid() || H5Sget_simple_extent_ndims(space.get()) != 1)
    return absl::DataLossError(absl::StrCat(path, ": dataset '", name, "' must be 1-D"));
  hsize_t dims[1] = {0};
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  *length = static_cast<int64_t>(dims[0]);
  return ds;
}

absl::Status ReadSlab(hid_t ds, hid_t mem_type, int64_t offset, int64_t count, void* out,
                      const std::string& path, const char* name) {
  Handle fspace(H5Dget_space(ds), Handle::kDataspace);
  hsize_t start[1] = {static_cast<hsize_t>(offset)}, cnt[1] = {static_cast<hsize_t>(count)};
  Handle mspace(H5Screate_simple(1, cnt, nullptr), Handle::kDataspace);
  if (!fspace.valid() || !mspace.valid() ||
      H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start, nullptr, cnt, nullptr) < 0 ||
      H5Dread(ds, mem_type, mspace.get(), fspace.get(), H5P_DEFAULT, out) < 0)
    return H5Error(absl::StatusCode::kDataLoss, path,
                   absl::StrFormat("cannot read %s[%d, %d)", name, offset, offset + count));
  return absl::OkStatus();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ShardWriter

absl::StatusOr<std::unique_ptr<ShardWriter>> ShardWriter::Create(const std::string& path,
                                                                 const ShardMeta& meta,
                                                                 int64_t chunk_tokens) {
  if (meta.vocab_size <= 0 || meta.vocab_size > (int64_t{1} << 32))
    return absl::InvalidArgumentError(absl::StrCat(path, ": bad vocab_size ", meta.vocab_size));
  if (chunk_tokens <= 0) chunk_tokens = 1 << 16;
  H5Guard g;
  std::unique_ptr<ShardWriter> w(new ShardWriter);
  w->path_ = path;
  w->tmp_path_ = path + ".tmp";
  w->meta_ = meta;
  w->meta_.num_tokens = 0;
  w->meta_.num_segments = 0;
  w->chunk_tokens_ = chunk_tokens;
  w->file_ = Handle(H5Fcreate(w->tmp_path_.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), Handle::kFile);
  if (!w->file_.valid()) return H5Error(absl::StatusCode::kUnavailable, w->tmp_path_, "cannot create file");
  hsize_t dims[1] = {0}, maxdims[1] = {H5S_UNLIMITED}, chunk[1] = {static_cast<hsize_t>(chunk_tokens)};
  Handle space(H5Screate_simple(1, dims, maxdims), Handle::kDataspace);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), Handle::kPlist);
  H5Pset_chunk(dcpl.get(), 1, chunk);
  if (H5Pset_fletcher32(dcpl.get()) < 0)
    return H5Error(absl::StatusCode::kInternal, w->tmp_path_, "cannot add the Fletcher-32 filter");
  w->tokens_ = Handle(
      H5Dcreate2(w->file_.get(), "tokens", H5T_STD_U32LE, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
      Handle::kDataset);
  if (!w->tokens_.valid())
    return H5Error(absl::StatusCode::kInternal, w->tmp_path_, "cannot create dataset tokens");
  w->buffer_.reserve(static_cast<size_t>(chunk_tokens));
  return w;
}

ShardWriter::~ShardWriter() {
  if (!closed_) {
    H5Guard g;
    tokens_.Reset();
    file_.Reset();
    std::error_code ec;
    std::filesystem::remove(tmp_path_, ec);
  }
}

absl::Status ShardWriter::Append(const int32_t* tokens, int64_t n, bool starts_segment) {
  if (closed_) return absl::FailedPreconditionError(absl::StrCat(path_, ": Append after Close"));
  if (starts_segment) doc_offsets_.push_back(static_cast<uint64_t>(meta_.num_tokens));
  for (int64_t i = 0; i < n; ++i) {
    int32_t t = tokens[i];
    if (t < 0 || t >= meta_.vocab_size)
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: token id %d at offset %d is outside the vocabulary [0, %d)", path_, t,
                          meta_.num_tokens, meta_.vocab_size));
    buffer_.push_back(static_cast<uint32_t>(t));
    ++meta_.num_tokens;
    if (static_cast<int64_t>(buffer_.size()) >= chunk_tokens_) {
      absl::Status s = Flush();
      if (!s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::Status ShardWriter::Flush() {
  if (buffer_.empty()) return absl::OkStatus();
  H5Guard g;
  hsize_t newdims[1] = {static_cast<hsize_t>(written_ + static_cast<int64_t>(buffer_.size()))};
  if (H5Dset_extent(tokens_.get(), newdims) < 0)
    return H5Error(absl::StatusCode::kInternal, tmp_path_, "cannot extend dataset tokens");
  Handle fspace(H5Dget_space(tokens_.get()), Handle::kDataspace);
  hsize_t start[1] = {static_cast<hsize_t>(written_)}, cnt[1] = {buffer_.size()};
  Handle mspace(H5Screate_simple(1, cnt, nullptr), Handle::kDataspace);
  if (H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, start, nullptr, cnt, nullptr) < 0 ||
      H5Dwrite(tokens_.get(), H5T_NATIVE_UINT32, mspace.get(), fspace.get(), H5P_DEFAULT, buffer_.data()) < 0)
    return H5Error(absl::StatusCode::kInternal, tmp_path_, "cannot write tokens");
  written_ += static_cast<int64_t>(buffer_.size());
  buffer_.clear();
  return absl::OkStatus();
}

absl::Status ShardWriter::Close() {
  if (closed_) return absl::OkStatus();
  absl::Status s = Flush();
  if (!s.ok()) return s;
  meta_.num_tokens = written_;
  meta_.num_segments = static_cast<int64_t>(doc_offsets_.size());
  H5Guard g;
  std::vector<uint64_t> offsets = doc_offsets_;
  offsets.push_back(static_cast<uint64_t>(written_));
  hsize_t dims[1] = {offsets.size()};
  Handle space(H5Screate_simple(1, dims, nullptr), Handle::kDataspace);
  Handle ds(H5Dcreate2(file_.get(), "doc_offsets", H5T_STD_U64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT,
                       H5P_DEFAULT),
            Handle::kDataset);
  if (!ds.valid() || H5Dwrite(ds.get(), H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets.data()) < 0)
    return H5Error(absl::StatusCode::kInternal, tmp_path_, "cannot write doc_offsets");
  ds.Reset();
  hid_t root = file_.get();
  for (auto st : {WriteStringAttr(root, "format", kFormat, tmp_path_),
                  WriteInt64Attr(root, "format_version", kFormatVersion, tmp_path_),
                  WriteStringAttr(root, "tokenizer", meta_.tokenizer, tmp_path_),
                  WriteInt64Attr(root, "vocab_size", meta_.vocab_size, tmp_path_),
                  WriteInt64Attr(root, "bos_id", meta_.bos_id, tmp_path_),
                  WriteInt64Attr(root, "eos_id", meta_.eos_id, tmp_path_),
                  WriteInt64Attr(root, "num_tokens", meta_.num_tokens, tmp_path_),
                  WriteInt64Attr(root, "continues_document", meta_.continues_document ? 1 : 0, tmp_path_)}) {
    if (!st.ok()) return st;
  }
  tokens_.Reset();
  if (file_.Close() < 0) return H5Error(absl::StatusCode::kInternal, tmp_path_, "cannot close file");
  std::error_code ec;
  std::filesystem::rename(tmp_path_, path_, ec);
  if (ec)
    return absl::UnavailableError(
        absl::StrCat(path_, ": cannot rename from ", tmp_path_, ": ", ec.message()));
  closed_ = true;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// ShardReader

absl::StatusOr<std::unique_ptr<ShardReader>> ShardReader::Open(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec))
    return absl::NotFoundError(absl::StrCat(path, ": shard file not found"));
  if (!std::filesystem::is_regular_file(path, ec))
    return absl::InvalidArgumentError(absl::StrCat(path, ": shard is not a regular file"));
  H5Guard g;
  std::unique_ptr<ShardReader> r(new ShardReader);
  r->path_ = path;
  htri_t is_h5 = H5Fis_hdf5(path.c_str());
  if (is_h5 <= 0) return H5Error(absl::StatusCode::kDataLoss, path, "not an HDF5 file (corrupt shard?)");
  r->file_ = Handle(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), Handle::kFile);
  if (!r->file_.valid())
    return H5Error(absl::StatusCode::kDataLoss, path, "cannot open shard (corrupt or truncated file?)");
  hid_t root = r->file_.get();

  auto fmt = ReadStringAttr(root, "format", path);
  if (!fmt.ok()) return fmt.status();
  if (*fmt != kFormat)
    return absl::DataLossError(
        absl::StrCat(path, ": attribute format is '", *fmt, "', expected '", kFormat, "'"));
  auto ver = ReadInt64Attr(root, "format_version", path);
  if (!ver.ok()) return ver.status();
  if (*ver == 1)
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": format_version 1, written by an older dmc-prep without checksums of the token "
              "data; re-make the shards with this dmc-prep (the same --input, --tokenizer and "
              "flags) so that damaged data is caught"));
  if (*ver != kFormatVersion)
    return absl::DataLossError(absl::StrCat(path, ": unsupported format_version ", *ver));
  ShardMeta& m = r->meta_;
  auto tok = ReadStringAttr(root, "tokenizer", path);
  if (!tok.ok()) return tok.status();
  m.tokenizer = *tok;
  for (auto [name, dst] : {std::pair<const char*, int64_t*>{"vocab_size", &m.vocab_size},
                           {"bos_id", &m.bos_id},
                           {"eos_id", &m.eos_id}}) {
    auto v = ReadInt64Attr(root, name, path);
    if (!v.ok()) return v.status();
    *dst = *v;
  }
  if (m.vocab_size <= 0) return absl::DataLossError(absl::StrCat(path, ": bad vocab_size ", m.vocab_size));
  auto cont = ReadInt64Attr(root, "continues_document", path);
  if (!cont.ok()) return cont.status();
  m.continues_document = *cont != 0;
  auto attr_tokens = ReadInt64Attr(root, "num_tokens", path);
  if (!attr_tokens.ok()) return attr_tokens.status();

  // Chunk cache off: the loader's windows are random, so a cached chunk would rarely serve a
  // second read, and each read still moves whole chunks, as the checksum needs them.
  Handle dapl(H5Pcreate(H5P_DATASET_ACCESS), Handle::kPlist);
  H5Pset_chunk_cache(dapl.get(), H5D_CHUNK_CACHE_NSLOTS_DEFAULT, 0, 1.0);
  auto tokens = Open1D(root, "tokens", 4, dapl.get(), path, &m.num_tokens);
  if (!tokens.ok()) return tokens.status();
  r->tokens_ = std::move(*tokens);
  Handle dcpl(H5Dget_create_plist(r->tokens_.get()), Handle::kPlist);
  hsize_t chunk[1] = {0};
  unsigned flags = 0;
  size_t nvalues = 0;
  if (!dcpl.valid() || H5Pget_chunk(dcpl.get(), 1, chunk) != 1 || chunk[0] == 0 ||
      H5Pget_filter_by_id2(dcpl.get(), H5Z_FILTER_FLETCHER32, &flags, &nvalues, nullptr, 0,
                           nullptr, nullptr) < 0) {
    H5ErrorText();  // clear
    return absl::DataLossError(
        absl::StrCat(path, ": dataset tokens is not chunked with Fletcher-32 checksums"));
  }
  r->chunk_tokens_ = static_cast<int64_t>(chunk[0]);
  if (m.num_tokens != *attr_tokens)
    return absl::DataLossError(absl::StrFormat(
        "%s: dataset tokens holds %d tokens but attribute num_tokens says %d (truncated shard?)", path,
        m.num_tokens, *attr_tokens));

  int64_t n_offsets = 0;
  auto offs = Open1D(root, "doc_offsets", 8, H5P_DEFAULT, path, &n_offsets);
  if (!offs.ok()) return offs.status();
  if (n_offsets < 1) return absl::DataLossError(absl::StrCat(path, ": dataset doc_offsets is empty"));
  uint64_t last = 0;
  absl::Status s = ReadSlab(offs->get(), H5T_NATIVE_UINT64, n_offsets - 1, 1, &last, path, "doc_offsets");
  if (!s.ok()) return s;
  if (last != static_cast<uint64_t>(m.num_tokens))
    return absl::DataLossError(
        absl::StrFormat("%s: doc_offsets ends at %d but the shard holds %d tokens (truncated shard?)", path,
                        last, m.num_tokens));
  m.num_segments = n_offsets - 1;
  r->filespace_ = Handle(H5Dget_space(r->tokens_.get()), Handle::kDataspace);
  return r;
}

ShardReader::~ShardReader() {
  H5Guard g;
  filespace_.Reset();
  tokens_.Reset();
  file_.Reset();
}

absl::Status ShardReader::Read(int64_t offset, int64_t count, uint32_t* out) {
  if (offset < 0 || count < 0 || offset + count > meta_.num_tokens)
    return absl::OutOfRangeError(absl::StrFormat("%s: read [%d, %d) outside the %d tokens of the shard",
                                                 path_, offset, offset + count, meta_.num_tokens));
  if (count == 0) return absl::OkStatus();
  H5Guard g;
  absl::Status s = ReadTokens(offset, count, out);
  if (s.ok()) return s;
  absl::Status damaged = NameDamagedChunk(offset, count);
  return damaged.ok() ? s : damaged;
}

absl::Status ShardReader::ReadTokens(int64_t offset, int64_t count, uint32_t* out) {
  hsize_t start[1] = {static_cast<hsize_t>(offset)}, cnt[1] = {static_cast<hsize_t>(count)};
  Handle mspace(H5Screate_simple(1, cnt, nullptr), Handle::kDataspace);
  if (H5Sselect_hyperslab(filespace_.get(), H5S_SELECT_SET, start, nullptr, cnt, nullptr) < 0 ||
      H5Dread(tokens_.get(), H5T_NATIVE_UINT32, mspace.get(), filespace_.get(), H5P_DEFAULT, out) < 0)
    return H5Error(absl::StatusCode::kDataLoss, path_,
                   absl::StrFormat("cannot read tokens[%d, %d)", offset, offset + count));
  return absl::OkStatus();
}

absl::Status ShardReader::NameDamagedChunk(int64_t offset, int64_t count) {
  std::vector<uint32_t> chunk(static_cast<size_t>(chunk_tokens_));
  for (int64_t c = offset / chunk_tokens_; c <= (offset + count - 1) / chunk_tokens_; ++c) {
    const int64_t begin = c * chunk_tokens_;
    const int64_t end = std::min(begin + chunk_tokens_, meta_.num_tokens);
    if (ReadTokens(begin, end - begin, chunk.data()).ok()) continue;
    H5ErrorText();  // clear
    return absl::DataLossError(absl::StrFormat(
        "%s: token chunk %d (tokens [%d, %d)) fails its Fletcher-32 checksum: the shard is damaged "
        "on disk; re-make it with dmc-prep",
        path_, c, begin, end));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> ShardReader::ReadDocOffsets() {
  H5Guard g;
  int64_t n = 0;
  auto ds = Open1D(file_.get(), "doc_offsets", 8, H5P_DEFAULT, path_, &n);
  if (!ds.ok()) return ds.status();
  std::vector<uint64_t> out(static_cast<size_t>(n));
  absl::Status s = ReadSlab(ds->get(), H5T_NATIVE_UINT64, 0, n, out.data(), path_, "doc_offsets");
  if (!s.ok()) return s;
  return out;
}

}  // namespace dmc::data
