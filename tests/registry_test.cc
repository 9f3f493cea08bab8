// The model registry: SHA-256 against known vectors and PostgreSQL's own, import/export through
// the broker round-trips byte for byte, versions grow, and a worker loads a model by name from
// the registry (cached and verified) and transcribes with it.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "common/sha256.h"
#include "tests/harness.h"

namespace asrf::testing {
namespace {

namespace fs = std::filesystem;
const std::string kModel = std::string(ASRF_SOURCE_DIR) + "/tests/fixtures/digits.pt";

// A zip archive holding one stored file: the shape of a model file, not a model.
std::string StoredZip(const std::string& path) {
  const std::string name = "data.txt", data = "not a model";
  auto u16 = [](std::string& s, uint16_t v) { s.push_back(static_cast<char>(v & 0xff)); s.push_back(static_cast<char>(v >> 8)); };
  auto u32 = [&](std::string& s, uint32_t v) { u16(s, static_cast<uint16_t>(v & 0xffff)); u16(s, static_cast<uint16_t>(v >> 16)); };
  std::string z;
  u32(z, 0x04034b50); u16(z, 20); u16(z, 0); u16(z, 0); u16(z, 0); u16(z, 0); u32(z, 0);
  u32(z, static_cast<uint32_t>(data.size())); u32(z, static_cast<uint32_t>(data.size()));
  u16(z, static_cast<uint16_t>(name.size())); u16(z, 0);
  z += name + data;
  const uint32_t cd = static_cast<uint32_t>(z.size());
  u32(z, 0x02014b50); u16(z, 20); u16(z, 20); u16(z, 0); u16(z, 0); u16(z, 0); u16(z, 0); u32(z, 0);
  u32(z, static_cast<uint32_t>(data.size())); u32(z, static_cast<uint32_t>(data.size()));
  u16(z, static_cast<uint16_t>(name.size())); u16(z, 0); u16(z, 0); u16(z, 0); u16(z, 0); u32(z, 0); u32(z, 0);
  z += name;
  const uint32_t cd_size = static_cast<uint32_t>(z.size()) - cd;
  u32(z, 0x06054b50); u16(z, 0); u16(z, 0); u16(z, 1); u16(z, 1); u32(z, cd_size); u32(z, cd); u16(z, 0);
  std::ofstream(path, std::ios::binary) << z;
  return path;
}

TEST(Sha256, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Registry, ImportExportRoundTripAndAWorkerLoadsByName) {
  TempDir t;
  PgCluster pg(t.path());
  ASSERT_TRUE(pg.Start());
  // A server whose sessions print bytea as escapes, not hex: every reader sets hex for itself.
  pg.Query("ALTER ROLE CURRENT_USER SET bytea_output = 'escape'");
  ASSERT_EQ(pg.Query("SELECT setting FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole, "
                     "unnest(s.setconfig) AS setting WHERE r.rolname = current_user"), "bytea_output=escape");
  BrokerProc b = StartBroker(t / "broker", t / "broker.log", {"--pg", pg.url()});
  ASSERT_FALSE(b.endpoint.empty());

  RunResult imp = Submit(b.endpoint, {"models", "import", kModel, "--name", "digits"});
  ASSERT_EQ(imp.code, 0) << imp.err;
  std::string original = ReadFile(kModel);
  std::string sha = Sha256Hex(original);
  EXPECT_NE(imp.out.find("version 1"), std::string::npos) << imp.out;
  EXPECT_NE(imp.out.find(sha), std::string::npos) << "our sha256 differs from PostgreSQL's: " << imp.out;

  RunResult exp = Submit(b.endpoint, {"models", "export", "digits", "--out", t / "back.pt"});
  ASSERT_EQ(exp.code, 0) << exp.err;
  EXPECT_TRUE(ReadFile(t / "back.pt") == original) << "export is not byte for byte the import";

  RunResult again = Submit(b.endpoint, {"models", "import", t / "back.pt", "--name", "digits", "--valid-cer", "0.031"});
  ASSERT_EQ(again.code, 0) << again.err;
  EXPECT_NE(again.out.find("version 2"), std::string::npos) << again.out;
  // The same import once more (as a client's resend of an unanswered request arrives) adds no version.
  RunResult resent = Submit(b.endpoint, {"models", "import", t / "back.pt", "--name", "digits", "--valid-cer", "0.031"});
  ASSERT_EQ(resent.code, 0) << resent.err;
  EXPECT_NE(resent.out.find("version 2"), std::string::npos) << resent.out;
  // Names become file names: one that is not a plain name is refused before anything is sent.
  RunResult badname = Submit(b.endpoint, {"models", "import", t / "back.pt", "--name", "../digits"});
  EXPECT_EQ(badname.code, 2) << badname.out;
  EXPECT_NE(badname.err.find("it names files"), std::string::npos) << badname.err;
  // Nor is a file that is no model at all (it would become the version every --model worker takes).
  RunResult notmodel = Submit(b.endpoint, {"models", "import", std::string(ASRF_SOURCE_DIR) + "/README.md",
                                           "--name", "digits"});
  EXPECT_EQ(notmodel.code, 2) << notmodel.out;
  EXPECT_NE(notmodel.err.find("is not a whole model file"), std::string::npos) << notmodel.err;
  // Nor an interrupted copy of one: it starts like a model and lacks the zip's directory at its end.
  { std::ofstream(t / "half.pt", std::ios::binary) << original.substr(0, original.size() / 2); }
  RunResult half = Submit(b.endpoint, {"models", "import", t / "half.pt", "--name", "digits"});
  EXPECT_EQ(half.code, 2) << half.out;
  EXPECT_NE(half.err.find("cut short"), std::string::npos) << half.err;
  // Nor a name a worker's cache would take for one of its versions (digits.v3.pt).
  RunResult vname = Submit(b.endpoint, {"models", "import", kModel, "--name", "digits.v3"});
  EXPECT_EQ(vname.code, 2) << vname.out;
  EXPECT_NE(vname.err.find("not ending in .v and digits"), std::string::npos) << vname.err;
  RunResult list = Submit(b.endpoint, {"models", "list", "--json"});
  ASSERT_EQ(list.code, 0) << list.err;
  EXPECT_NE(list.out.find("\"version\":1"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("\"version\":2"), std::string::npos) << list.out;
  EXPECT_EQ(list.out.find("\"version\":3"), std::string::npos) << list.out;
  EXPECT_NE(list.out.find("\"valid_cer\":0.031"), std::string::npos) << list.out;
  RunResult missing = Submit(b.endpoint, {"models", "export", "nope", "--out", t / "x.pt"});
  EXPECT_NE(missing.code, 0);
  EXPECT_NE(missing.err.find("no model nope"), std::string::npos) << missing.err;

  // A worker loads "digits" by name: fetched, cached, verified, advertised, and it transcribes.
  // An older cached version goes; a model a training wrote under a look-alike name (no .sha256
  // beside it) stays.
  fs::create_directories(t / "worker/models");
  { std::ofstream(t / "worker/models/digits.v1.pt") << "an older version"; }
  { std::ofstream(t / "worker/models/digits.v1.sha256") << "0\n"; }
  { std::ofstream(t / "worker/models/digits.v0.pt") << "a model trained as digits.v0"; }
  Proc w = StartWorker(b.endpoint, t / "worker", t / "worker.log", {"--model", "digits", "--pg", pg.url()});
  RunResult synth = RunCommand({ASRF_SYNTH_BIN, "--out", t / "audio", "--utterances", "2", "--seed", "5",
                                "--numbers-fraction", "1", "--valid-fraction", "0", "--heldout-fraction", "0"});
  ASSERT_EQ(synth.code, 0) << synth.err;
  RunResult tx = Submit(b.endpoint, {"transcribe", t / "audio/wav", "--out", t / "out", "--model", "digits", "--wait"},
                        120000);
  EXPECT_EQ(tx.code, 0) << tx.err << ReadFile(t / "worker.log");
  EXPECT_TRUE(fs::exists(t / "worker/models/digits.v2.pt")) << ReadFile(t / "worker.log");
  EXPECT_EQ(ReadFile(t / "worker/models/digits.v2.pt"), original);
  EXPECT_FALSE(fs::exists(t / "worker/models/digits.v1.pt"));
  EXPECT_FALSE(fs::exists(t / "worker/models/digits.v1.sha256"));
  EXPECT_TRUE(fs::exists(t / "worker/models/digits.v0.pt"));
  w.Signal(SIGTERM);
  EXPECT_EQ(w.Wait(30000), 0);

  // A tampered cache is not used: it is fetched again and verified.
  { std::ofstream(t / "worker/models/digits.v2.pt", std::ios::trunc) << "garbage"; }
  Proc w2 = StartWorker(b.endpoint, t / "worker", t / "worker2.log", {"--model", "digits", "--pg", pg.url()});
  ASSERT_TRUE(WaitFor([&] { return ReadFile(t / "worker2.log").find("model_loaded") != std::string::npos; }, 30000))
      << ReadFile(t / "worker2.log");
  EXPECT_NE(ReadFile(t / "worker2.log").find("model_fetched"), std::string::npos);
  EXPECT_EQ(ReadFile(t / "worker/models/digits.v2.pt"), original);
  w2.Signal(SIGTERM);
  EXPECT_EQ(w2.Wait(30000), 0);

  // A whole zip that is no model becomes version 3 (the client checks only the archive's shape):
  // a worker keeps serving with version 2, cached and verified, and says so; version 2 stays.
  ASSERT_EQ(Submit(b.endpoint, {"models", "import", StoredZip(t / "notamodel.pt"), "--name", "digits"}).code, 0);
  Proc w3 = StartWorker(b.endpoint, t / "worker", t / "worker3.log", {"--model", "digits", "--pg", pg.url()});
  ASSERT_TRUE(WaitFor([&] { return ReadFile(t / "worker3.log").find("model_loaded") != std::string::npos; }, 30000))
      << ReadFile(t / "worker3.log");
  EXPECT_NE(ReadFile(t / "worker3.log").find("model_fallback"), std::string::npos) << ReadFile(t / "worker3.log");
  EXPECT_NE(ReadFile(t / "worker3.log").find("digits.v2.pt"), std::string::npos);
  EXPECT_TRUE(fs::exists(t / "worker/models/digits.v2.pt"));
  RunResult tx3 = Submit(b.endpoint, {"transcribe", t / "audio/wav", "--out", t / "out3", "--model", "digits", "--wait"},
                         120000);
  EXPECT_EQ(tx3.code, 0) << tx3.err << ReadFile(t / "worker3.log");
  w3.Signal(SIGTERM);
  EXPECT_EQ(w3.Wait(30000), 0);

  // The registry's newest bytes no longer match their checksum (damaged in the database): the
  // worker serves with its verified cached version 2 and says why (it exited 1).
  EXPECT_EQ(pg.Query("UPDATE models SET bytes = 'damaged'::bytea WHERE name = 'digits' AND version = 3"), "");
  fs::remove(t / "worker/models/digits.v3.pt");
  fs::remove(t / "worker/models/digits.v3.sha256");
  Proc w4 = StartWorker(b.endpoint, t / "worker", t / "worker4.log", {"--model", "digits", "--pg", pg.url()});
  ASSERT_TRUE(WaitFor([&] { return ReadFile(t / "worker4.log").find("model_loaded") != std::string::npos || !w4.Running(); },
                      30000));
  const std::string log4 = ReadFile(t / "worker4.log");
  EXPECT_NE(log4.find("model_from_cache"), std::string::npos) << log4;
  EXPECT_NE(log4.find("does not match its sha256"), std::string::npos) << log4;
  EXPECT_NE(log4.find("digits.v2.pt"), std::string::npos) << log4;
  EXPECT_TRUE(w4.Running()) << log4;
}

TEST(Registry, ABrokerWithoutPostgresSaysSo) {
  TempDir t;
  BrokerProc b = StartBroker(t / "broker", t / "broker.log");
  RunResult r = Submit(b.endpoint, {"models", "list"});
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("without --pg"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace asrf::testing
