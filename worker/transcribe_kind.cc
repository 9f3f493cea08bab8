#include "worker/transcribe_kind.h"

#include <cstring>
#include <mutex>

#include <nlohmann/json.hpp>

#include "common/clock.h"
#include "schema/protocol.h"

namespace asrf {

namespace {

constexpr size_t kMaxSegmentSamples = 240 * 16000;  // schema/protocol.md: pcm of at most 240 s

double Ms(double s) { return std::round(s * 1000.0) / 1000.0; }

}  // namespace

void RegisterTranscribeKind(std::shared_ptr<AcousticModel> model, JobRegistry* registry,
                            const std::string& model_sha256) {
  registry->AddModel(model->name());
  auto mu = std::make_shared<std::mutex>();
  registry->RegisterBatch(proto::kTranscribeKind, [model, mu, model_sha256](const std::vector<std::string_view>& payloads,
                                                              const BatchContext& ctx, std::vector<Status>* statuses,
                                                              std::vector<std::string>* results) {
    size_t n = payloads.size();
    std::vector<proto::TranscribeSegment> segs(n);
    std::vector<std::vector<int16_t>> pcm(n);
    std::vector<size_t> runnable;
    std::vector<std::span<const int16_t>> spans;
    for (size_t i = 0; i < n; ++i) {
      Status st = proto::DecodeBody(payloads[i], &segs[i]);
      if (st.ok() && segs[i].pcm.data.size() % 2 != 0) st = Status::Invalid("pcm has an odd number of bytes");
      if (st.ok() && (segs[i].file.size() > 4096 || segs[i].source.size() > 4096 || segs[i].out.size() > 4096 * 3)) {
        st = Status::Invalid("file name over 4096 bytes");
      }
      // The protocol's bound: the decoder's memory grows with a segment's length, and faster.
      if (st.ok() && segs[i].pcm.data.size() / 2 > kMaxSegmentSamples) {
        st = Status::Invalid("pcm of " + std::to_string(segs[i].pcm.data.size() / 2 / 16000) +
                             " s, over the 240 s a segment may have");
      }
      if (!st.ok()) {
        (*statuses)[i] = Status::Invalid("bad transcribe payload: " + st.message());
        continue;
      }
      pcm[i].resize(segs[i].pcm.data.size() / 2);
      std::memcpy(pcm[i].data(), segs[i].pcm.data.data(), pcm[i].size() * 2);  // little-endian hosts
      std::string().swap(segs[i].pcm.data);
      runnable.push_back(i);
      spans.emplace_back(pcm[i].data(), pcm[i].size());
    }
    if (runnable.empty() || (ctx.all_cancelled && ctx.all_cancelled())) return;
    std::vector<Hypothesis> hyps;
    int64_t t0 = MonoUs();
    Status st;
    std::vector<Status> item_status(runnable.size());
    {
      std::lock_guard<std::mutex> lock(*mu);
      st = model->Transcribe(spans, &hyps);
      if (!st.ok() && spans.size() > 1) {
        // The batch as a whole failed: run the segments one by one so one bad input fails alone.
        hyps.assign(spans.size(), Hypothesis{});
        for (size_t k = 0; k < spans.size(); ++k) {
          if (ctx.all_cancelled && ctx.all_cancelled()) {  // each one alone takes a while
            item_status[k] = Status::Unavailable("cancelled");
            continue;
          }
          std::vector<Hypothesis> one;
          item_status[k] = model->Transcribe({spans[k]}, &one);
          if (item_status[k].ok() && !one.empty()) hyps[k] = std::move(one.front());
        }
        st = Status::Ok();
      }
    }
    int64_t infer_ms = (MonoUs() - t0) / 1000;
    for (size_t k = 0; k < runnable.size(); ++k) {
      size_t i = runnable[k];
      if (!st.ok() || !item_status[k].ok()) {
        (*statuses)[i] = st.ok() ? item_status[k] : st;
        continue;
      }
      const Hypothesis& h = hyps[k];
      nlohmann::json words = nlohmann::json::array();
      for (const auto& w : h.words) {
        words.push_back({{"w", w.text}, {"s", Ms(w.start)}, {"e", Ms(w.end)}, {"c", Ms(w.confidence)}});
      }
      nlohmann::json j = {{"file", segs[i].file},
                          {"index", segs[i].index},
                          {"count", segs[i].count},
                          {"offset_s", segs[i].offset_s},
                          {"duration_s", Ms(static_cast<double>(pcm[i].size()) / 16000.0)},
                          {"model", model->name()},
                          {"text", h.text},
                          {"words", std::move(words)},
                          {"infer_ms", infer_ms}};
      if (!model_sha256.empty()) j["model_sha256"] = model_sha256;
      if (!segs[i].source.empty()) j["source"] = segs[i].source;
      if (segs[i].file_duration_s > 0) j["file_duration_s"] = segs[i].file_duration_s;
      if (!segs[i].out.empty()) j["out"] = segs[i].out;
      if (segs[i].source_size > 0) j["source_size"] = segs[i].source_size;
      if (segs[i].source_mtime_ns != 0) j["source_mtime_ns"] = segs[i].source_mtime_ns;
      (*results)[i] = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    }
  });
}

}  // namespace asrf
