// The wire codec: round trips, and hostile input (truncated, malformed, oversized, wrong version).
#include <gtest/gtest.h>

#include "schema/protocol.h"

namespace asrf::proto {
namespace {

TEST(Codec, SubmitRoundTripKeepsEveryField) {
  Submit s;
  s.req = 42;
  s.request_id = "batch-1/0";
  s.batch = "batch-1";
  for (int i = 0; i < 3; ++i) {
    SubmitJob j;
    j.kind = "echo";
    j.payload.data = std::string("{\"i\":") + std::to_string(i) + "}";
    j.payload.data.push_back('\0');  // payloads are bytes, not text
    j.priority = i - 1;
    j.timeout_ms = 1000 * i;
    s.jobs.push_back(j);
  }
  Submit out;
  ASSERT_TRUE(DecodeBody(EncodeBody(s), &out).ok());
  EXPECT_EQ(out.req, 42u);
  EXPECT_EQ(out.request_id, "batch-1/0");
  ASSERT_EQ(out.jobs.size(), 3u);
  EXPECT_EQ(out.jobs[2].payload.data, s.jobs[2].payload.data);
  EXPECT_EQ(out.jobs[0].priority, -1);
  EXPECT_EQ(out.jobs[2].timeout_ms, 2000);
  EXPECT_TRUE(Validate(out).ok());
}

TEST(Codec, ResultAndAssignRoundTrip) {
  Result r;
  r.results.push_back({7, (5ull << 32) + 3, true, Blob{"hello"}, "", 12});
  r.results.push_back({8, 9, false, Blob{}, "boom", 1});
  Result out;
  ASSERT_TRUE(DecodeBody(EncodeBody(r), &out).ok());
  ASSERT_EQ(out.results.size(), 2u);
  EXPECT_EQ(out.results[0].epoch, (5ull << 32) + 3);
  EXPECT_EQ(out.results[0].result.data, "hello");
  EXPECT_FALSE(out.results[1].ok);
  EXPECT_EQ(out.results[1].error, "boom");

  Assign a;
  a.jobs.push_back({1, 2, "sleep", Blob{"{\"ms\":1}"}, 500, 1});
  Assign a2;
  ASSERT_TRUE(DecodeBody(EncodeBody(a), &a2).ok());
  EXPECT_EQ(a2.jobs.at(0).kind, "sleep");
  EXPECT_EQ(a2.jobs.at(0).timeout_ms, 500);
  EXPECT_EQ(a2.jobs.at(0).attempt, 1u);
}

TEST(Codec, UnknownFieldsAreIgnoredAndMissingOnesTakeDefaults) {
  // A newer peer's STATUS with an extra field, and an older one's without "batch".
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_map(3);
  pk.pack(std::string("req"));
  pk.pack(uint64_t{5});
  pk.pack(std::string("job"));
  pk.pack(uint64_t{99});
  pk.pack(std::string("future_field"));
  pk.pack(std::string("whatever"));
  StatusReq m;
  ASSERT_TRUE(DecodeBody(std::string_view(buf.data(), buf.size()), &m).ok());
  EXPECT_EQ(m.req, 5u);
  EXPECT_EQ(m.job, 99u);
  EXPECT_EQ(m.batch, "");
}

TEST(Codec, TruncatedBodyIsAnErrorAtEveryCut) {
  Submit s;
  s.request_id = "r";
  s.jobs.push_back({"echo", Blob{"{\"a\":1}"}, 0, 0});
  std::string body = EncodeBody(s);
  for (size_t cut = 0; cut < body.size(); ++cut) {
    Submit out;
    Status st = DecodeBody(std::string_view(body.data(), cut), &out);
    EXPECT_FALSE(st.ok()) << "cut at " << cut;
  }
}

TEST(Codec, MalformedBodiesAreErrorsNotCrashes) {
  Submit out;
  EXPECT_FALSE(DecodeBody("", &out).ok());
  EXPECT_FALSE(DecodeBody("\xc1", &out).ok());                     // never-used MessagePack byte
  EXPECT_FALSE(DecodeBody(EncodeBody(std::vector<int>{1, 2}), &out).ok());  // not a map
  EXPECT_FALSE(DecodeBody(EncodeBody(42), &out).ok());
  // "jobs" of the wrong type.
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_map(1);
  pk.pack(std::string("jobs"));
  pk.pack(std::string("not a list"));
  Status st = DecodeBody(std::string_view(buf.data(), buf.size()), &out);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("malformed"), std::string::npos);
  // Trailing garbage after a valid map.
  std::string body = EncodeBody(StatusReq{}) + "x";
  StatusReq sr;
  EXPECT_FALSE(DecodeBody(body, &sr).ok());
}

TEST(Codec, HostileSizesAreRefusedBeforeAllocation) {
  // A 5-byte body claiming an array of 4 billion entries.
  const char huge_array[] = {'\x81', '\xa4', 'j', 'o', 'b', 's', '\xdd', '\xff', '\xff', '\xff', '\xff'};
  Submit out;
  Status st = DecodeBody(std::string_view(huge_array, sizeof(huge_array)), &out);
  EXPECT_FALSE(st.ok());
  // A payload over the per-job limit.
  Submit s;
  s.jobs.push_back({"echo", Blob{std::string(kMaxPayloadBytes + 1, 'x')}, 0, 0});
  EXPECT_FALSE(DecodeBody(EncodeBody(s), &out).ok());
  // Too many jobs in one message.
  Submit many;
  many.jobs.resize(kMaxJobsPerMessage + 1, SubmitJob{"echo", Blob{"{}"}, 0, 0});
  Submit decoded;
  Status vs = DecodeBody(EncodeBody(many), &decoded);
  if (vs.ok()) vs = Validate(decoded);
  EXPECT_FALSE(vs.ok());
  // Many tiny values, each array within its limit: {"x": [[nil x 100] x 20,000]} declares 2 M
  // values in 2 MB; decoded they would take about 50 MB. Refused by the count, before decoding.
  std::string body = "\x81\xa1x\xdc\x4e\x20";  // map of 1, "x", array16 of 20,000
  std::string inner = std::string("\xdc\x00\x64", 3) + std::string(100, '\xc0');  // array16 of 100 nils
  for (int i = 0; i < 20000; ++i) body += inner;
  msgpack::object_handle h;
  Status count = DecodeRaw(body, &h);
  EXPECT_FALSE(count.ok());
  EXPECT_NE(count.message().find("values"), std::string::npos) << count.ToString();
  // The same shape with 40 per inner array (820,000 values) is a well-formed map.
  std::string small = "\x81\xa1x\xdc\x4e\x20";
  for (int i = 0; i < 20000; ++i) small += std::string("\xdc\x00\x28", 3) + std::string(40, '\xc0');
  Status fine = DecodeRaw(small, &h);
  EXPECT_TRUE(fine.ok()) << fine.ToString();
}

TEST(Codec, DeeplyNestedBodyIsRefusedWithItsOwnMessage) {
  // {"x": [[[ ... ]]]} 40 arrays deep: past the decoder's depth limit of 16.
  std::string body = "\x81\xa1x";
  for (int i = 0; i < 40; ++i) body += '\x91';  // fixarray of 1
  body += '\xc0';
  msgpack::object_handle h;
  Status st = DecodeRaw(body, &h);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("nested too deeply"), std::string::npos) << st.ToString();
  // 10 deep is within the limit.
  std::string shallow = "\x81\xa1x" + std::string(10, '\x91') + "\xc0";
  Status ok = DecodeRaw(shallow, &h);
  EXPECT_TRUE(ok.ok()) << ok.ToString();
}

TEST(Codec, ValidateRejectsBadJobs) {
  Submit s;
  EXPECT_FALSE(Validate(s).ok()) << "no jobs";
  s.jobs.push_back({"", Blob{"{}"}, 0, 0});
  EXPECT_FALSE(Validate(s).ok()) << "empty kind";
  s.jobs[0].kind = "echo";
  s.jobs[0].timeout_ms = -1;
  EXPECT_FALSE(Validate(s).ok()) << "negative timeout";
  s.jobs[0].timeout_ms = 0;
  EXPECT_TRUE(Validate(s).ok());
  s.jobs[0].timeout_ms = kMaxTimeoutMs;
  EXPECT_TRUE(Validate(s).ok()) << "30 days";
  s.jobs[0].timeout_ms = INT64_MAX;  // would overflow the deadline (now + timeout)
  EXPECT_FALSE(Validate(s).ok()) << "timeout over 30 days";
}

TEST(Codec, TagCarriesTheVersion) {
  EXPECT_TRUE(CheckTag("ASRF/1").ok());
  Status v2 = CheckTag("ASRF/2");
  EXPECT_EQ(v2.code(), Status::Code::kUnavailable);
  EXPECT_NE(v2.message().find("unsupported_version"), std::string::npos);
  EXPECT_EQ(CheckTag("HTTP/1.1").code(), Status::Code::kInvalid);
  EXPECT_EQ(CheckTag("").code(), Status::Code::kInvalid);
  EXPECT_FALSE(CheckTag(std::string(1000, 'A')).ok());
}

TEST(Codec, CommandFrameIsOneKnownByte) {
  Cmd c;
  EXPECT_TRUE(ParseCmd(std::string(1, '\x01'), &c).ok());
  EXPECT_EQ(c, Cmd::kSubmit);
  EXPECT_FALSE(ParseCmd(std::string(1, '\x7e'), &c).ok());
  EXPECT_FALSE(ParseCmd("", &c).ok());
  EXPECT_FALSE(ParseCmd("\x01\x01", &c).ok());
}

TEST(Codec, StateNamesRoundTrip) {
  for (int i = 0; i < kNumStates; ++i) {
    JobState s;
    ASSERT_TRUE(ParseState(StateName(static_cast<JobState>(i)), &s));
    EXPECT_EQ(static_cast<int>(s), i);
  }
  JobState s;
  EXPECT_FALSE(ParseState("running", &s));
}

}  // namespace
}  // namespace asrf::proto
