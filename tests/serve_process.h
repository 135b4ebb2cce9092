// dmc-serve as a child process for the server tests (tests/test_serve.cpp on the CPU engine,
// tests/cuda/test_cuda_serve.cpp on the GPU one): a tiny model exported in Hugging Face layout to
// a temporary folder, the server on a free loopback port, and the SIGTERM check both run.
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "model/llama.h"
#include "nlohmann/json.hpp"
#include "parallel/communicator.h"
#include "tests/tiny_models.h"
#include "trainer/checkpoint.h"
#include "trainer/export.h"
#include "trainer/optimizer.h"

namespace dmc::serve_test {

namespace fs = std::filesystem;

// The build's inference tools: next to the test binary's folder (build/tests → build/inference).
inline std::string InferenceBinary(const std::string& name) {
  return (fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "inference" / name)
      .string();
}

// A shell command's exit status (as pclose gives it) and standard output.
struct CommandRun {
  int status = -1;
  std::string out;
};
inline CommandRun RunCommand(const std::string& command) {
  CommandRun run;
  FILE* p = popen(command.c_str(), "r");
  EXPECT_NE(p, nullptr) << command;
  if (p == nullptr) return run;
  char buf[4096];
  for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) run.out.append(buf, n);
  run.status = pclose(p);
  return run;
}

// A folder removed when the process ends.
struct TempRoot {
  explicit TempRoot(const std::string& name)
      : path(fs::temp_directory_path() / (name + "_" + std::to_string(getpid()))) {
    fs::remove_all(path);
  }
  ~TempRoot() { fs::remove_all(path); }
  fs::path path;
};

// A model of `config` with random weights from `seed`, saved and exported (fp32) under root/hf.
inline std::string ExportRandomModel(const model::LlamaConfig& config, uint64_t seed,
                                     const fs::path& root) {
  model::Llama<float> m(config, nullptr);
  tiny_models::RandomizeParams(m, seed);
  trainer::AdamW opt(trainer::OptimizerConfig{}, m.params().size());
  parallel::LocalCommunicator local;
  trainer::Checkpointer ckpt((root / "ckpt").string(), 1, &local, 0, 1, 0);
  EXPECT_TRUE(ckpt.Save(m, opt, {1, 0, 0, "c", 1, ""}).ok());
  EXPECT_TRUE(trainer::ExportCheckpoint((root / "ckpt").string(), (root / "hf").string(),
                                        model::DType::kF32, int64_t(1) << 30)
                  .ok());
  return (root / "hf").string();
}

// dmc-serve --model=model_dir --port=0 FLAGS... as a child process (it prints the port once
// bound), healthy before the constructor returns.
class Server {
 public:
  Server(const std::string& model_dir, std::vector<std::string> flags) {
    flags.insert(flags.begin(),
                 {InferenceBinary("dmc-serve"), "--model=" + model_dir, "--port=0"});
    int out[2];
    EXPECT_EQ(pipe(out), 0);
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      std::vector<char*> argv;
      for (std::string& f : flags) argv.push_back(f.data());
      argv.push_back(nullptr);
      setenv("OMP_NUM_THREADS", "1", 1);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    FILE* f = fdopen(out[0], "r");
    char line[512] = {0};
    EXPECT_NE(fgets(line, sizeof line, f), nullptr) << "dmc-serve exited before listening";
    fclose(f);
    const std::string s = line;
    const size_t colon = s.find(':', s.find("127.0.0.1"));
    EXPECT_NE(colon, std::string::npos) << s;
    port_ = std::stoi(s.substr(colon + 1));
    // Bound and listening already; /health answers once the accept loop runs.
    httplib::Client c = client();
    bool healthy = false;
    for (int attempt = 0; attempt < 200 && !healthy; ++attempt) {
      auto r = c.Get("/health");
      healthy = r && r->status == 200;
    }
    EXPECT_TRUE(healthy);
  }
  ~Server() {
    if (pid_ > 0) Terminate();
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // SIGTERM, then Wait.
  int Terminate() {
    Sigterm();
    return Wait();
  }
  void Sigterm() const { kill(pid_, SIGTERM); }
  // Waits for the server to exit; its exit status (128 + the signal when a signal ended it).
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(60, 0);
    return c;
  }
  int port() const { return port_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
};

// A streamed completion of `max_tokens` runs; SIGTERM as soon as its first bytes arrive, so the
// server has accepted it and streamed a token: the stream ends with one final event (a
// finish_reason: "shutdown", unless the answer had already ended) and [DONE], and the server exits
// 0. The client reads on while the server drains, and waits for the exit only after the stream
// has ended.
inline void ExpectSigtermEndsAStreamAndExitsZero(Server& server, int max_tokens) {
  httplib::Client c = server.client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body =
      nlohmann::json({{"prompt", "And"}, {"max_tokens", max_tokens}, {"stream", true}}).dump();
  req.set_header("Content-Type", "application/json");
  std::string received;
  bool signalled = false;
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    received.append(data, n);
    if (!signalled) {  // the stream runs: stop the server under it
      signalled = true;
      server.Sigterm();
    }
    return true;
  };
  httplib::Response res;
  httplib::Error err;
  EXPECT_TRUE(c.send(req, res, err)) << httplib::to_string(err);
  ASSERT_TRUE(signalled) << "no event arrived";
  EXPECT_EQ(server.Wait(), 0);
  std::vector<std::string> events;
  for (size_t at = 0, end; (end = received.find("\n\n", at)) != std::string::npos; at = end + 2) {
    ASSERT_EQ(received.compare(at, 6, "data: "), 0) << received;
    events.push_back(received.substr(at + 6, end - at - 6));
  }
  ASSERT_GE(events.size(), 2u) << received;
  EXPECT_EQ(events.back(), "[DONE]") << received;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const nlohmann::json finish = nlohmann::json::parse(events[i])["choices"][0]["finish_reason"];
    EXPECT_EQ(finish.is_string(), i + 2 == events.size()) << events[i];
  }
}

}  // namespace dmc::serve_test
