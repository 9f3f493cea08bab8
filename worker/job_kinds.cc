#include "worker/job_kinds.h"

#include <chrono>
#include <cstdlib>
#include <thread>

#include <nlohmann/json.hpp>

namespace asrf {

namespace {

Status ParseJson(std::string_view payload, nlohmann::json* out) {
  *out = nlohmann::json::parse(payload.begin(), payload.end(), nullptr, /*allow_exceptions=*/false);
  if (out->is_discarded()) {
    return Status::Invalid("malformed payload: not valid JSON (" + std::to_string(payload.size()) + " bytes)");
  }
  return Status::Ok();
}

}  // namespace

void RegisterDiagnosticKinds(JobRegistry* registry) {
  registry->Register("echo", [](std::string_view payload, const JobContext&, std::string* result) {
    if (!nlohmann::json::accept(payload.begin(), payload.end())) {
      return Status::Invalid("malformed payload: not valid JSON (" + std::to_string(payload.size()) + " bytes)");
    }
    result->assign(payload);
    return Status::Ok();
  });

  registry->Register("sleep", [](std::string_view payload, const JobContext& ctx, std::string* result) {
    nlohmann::json j;
    ASRF_RETURN_IF_ERROR(ParseJson(payload, &j));
    if (!j.is_object() || !j.contains("ms") || !j["ms"].is_number_integer()) {
      return Status::Invalid("malformed payload: sleep takes {\"ms\": N} with N an integer");
    }
    int64_t ms = j["ms"].get<int64_t>();
    if (ms < 0 || ms > 3600000) return Status::Invalid("malformed payload: sleep ms must be 0..3600000");
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (std::chrono::steady_clock::now() < until) {
      if (ctx.Cancelled()) return Status::Unavailable("cancelled");
      auto left = until - std::chrono::steady_clock::now();
      std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(left, std::chrono::milliseconds(10)));
    }
    *result = "{\"slept_ms\":" + std::to_string(ms) + "}";
    return Status::Ok();
  });

  registry->Register("fail", [](std::string_view payload, const JobContext&, std::string*) {
    nlohmann::json j;
    ASRF_RETURN_IF_ERROR(ParseJson(payload, &j));
    std::string message = "the job asked to fail";
    if (j.is_object() && j.contains("message") && j["message"].is_string()) message = j["message"].get<std::string>();
    return Status::Invalid(message);
  });

  registry->Register("crash", [](std::string_view payload, const JobContext&, std::string*) -> Status {
    std::abort();
  });
}

}  // namespace asrf
