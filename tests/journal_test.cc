// The journal under simulated power cuts and a full disk (FaultFs drops every unsynced byte).
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "broker/fault_fs.h"
#include "broker/journal.h"
#include "tests/harness.h"

namespace asrf {
namespace {

using testing::TempDir;

std::string Key(uint64_t i) { return "k/" + std::to_string(1000000 + i); }

// Writes keys from a background thread until stopped; each write asks for a completion.
struct Writer {
  Journal* j;
  bool sync;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> issued{0};
  std::thread t;
  void Start() {
    t = std::thread([this] {
      for (uint64_t i = 1; !stop; ++i) {
        JournalBatch b;
        b.Put(Key(i), std::string(100, 'v'));
        j->Write(std::move(b), sync, /*token=*/i);
        issued = i;
        if (i % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    });
  }
  void Join() {
    stop = true;
    t.join();
  }
};

// Collects completions until at least `want` are acknowledged, then simulates a power cut.
// Returns the tokens acknowledged before the cut.
std::set<uint64_t> RunUntilCrash(Journal* j, FaultFs* fs, size_t want) {
  std::set<uint64_t> acked;
  while (acked.size() < want) {
    for (const auto& c : j->TakeCompletions()) {
      EXPECT_TRUE(c.status.ok()) << c.status.ToString();
      acked.insert(c.token);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  for (const auto& c : j->TakeCompletions()) acked.insert(c.token);
  fs->Crash();  // from here on nothing reaches the disk, and nothing acknowledged later counts
  return acked;
}

std::set<std::string> Recovered(const std::string& dir) {
  std::unique_ptr<Journal> j;
  JournalOptions o;
  o.dir = dir;
  Status st = Journal::Open(o, &j);
  EXPECT_TRUE(st.ok()) << st.ToString();
  std::set<std::string> keys;
  if (!j) return keys;
  EXPECT_TRUE(j->Scan("k/", [&](std::string_view k, std::string_view) {
                 keys.insert(std::string(k));
                 return Status::Ok();
               }).ok());
  return keys;
}

TEST(Journal, EveryAcknowledgedWriteSurvivesAPowerCut) {
  TempDir tmp;
  FaultFs fs;
  std::set<uint64_t> acked;
  uint64_t issued = 0;
  {
    std::unique_ptr<Journal> j;
    JournalOptions o;
    o.dir = tmp / "journal";
    o.env = fs.env();
    ASSERT_TRUE(Journal::Open(o, &j).ok());
    Writer w{j.get(), /*sync=*/true, {}, {}, {}};
    w.Start();
    acked = RunUntilCrash(j.get(), &fs, 400);
    w.Join();
    issued = w.issued;
  }  // closing after the cut writes nothing
  std::set<std::string> keys = Recovered(tmp / "journal");
  for (uint64_t t : acked) ASSERT_TRUE(keys.count(Key(t))) << "acknowledged write " << t << " was lost";
  EXPECT_GE(issued, acked.size());
  EXPECT_GT(fs.syncs(), 0);
}

// The control: without sync, acknowledged writes are lost by the same simulated cut. This proves
// the fault file system really drops what was not synced, so the test above can fail.
TEST(Journal, UnsyncedWritesAreLostByTheSimulatedPowerCut) {
  TempDir tmp;
  FaultFs fs;
  std::set<uint64_t> acked;
  {
    std::unique_ptr<Journal> j;
    JournalOptions o;
    o.dir = tmp / "journal";
    o.env = fs.env();
    ASSERT_TRUE(Journal::Open(o, &j).ok());
    Writer w{j.get(), /*sync=*/false, {}, {}, {}};
    w.Start();
    acked = RunUntilCrash(j.get(), &fs, 400);
    w.Join();
  }
  std::set<std::string> keys = Recovered(tmp / "journal");
  size_t lost = 0;
  for (uint64_t t : acked) lost += keys.count(Key(t)) ? 0 : 1;
  EXPECT_GT(lost, 0u) << "unsynced writes survived the simulated cut: the fault injection is not working";
}

TEST(Journal, GroupCommitSharesSyncs) {
  TempDir tmp;
  std::unique_ptr<Journal> j;
  JournalOptions o;
  o.dir = tmp / "journal";
  ASSERT_TRUE(Journal::Open(o, &j).ok());
  for (uint64_t i = 1; i <= 2000; ++i) {
    JournalBatch b;
    b.Put(Key(i), "v");
    j->Write(std::move(b), true, i);
  }
  j->Flush();
  JournalStats s = j->Stats();
  EXPECT_EQ(s.batches, 2000u);
  EXPECT_LT(s.syncs, s.batches) << "every write paid its own sync";
  size_t completions = j->TakeCompletions().size();
  EXPECT_EQ(completions, 2000u);
}

TEST(Journal, FullDiskFailsWritesClearlyAndRecovers) {
  TempDir tmp;
  FaultFs fs;
  std::unique_ptr<Journal> j;
  JournalOptions o;
  o.dir = tmp / "journal";
  o.env = fs.env();
  ASSERT_TRUE(Journal::Open(o, &j).ok());
  auto write_one = [&](uint64_t token) {
    JournalBatch b;
    b.Put(Key(token), "v");
    j->Write(std::move(b), true, token);
    j->Flush();
    auto c = j->TakeCompletions();
    EXPECT_EQ(c.size(), 1u);
    return c.empty() ? Status::IOError("no completion") : c[0].status;
  };
  ASSERT_TRUE(write_one(1).ok());
  fs.SetNoSpace(true);
  Status st = write_one(2);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("space"), std::string::npos) << st.ToString();
  EXPECT_FALSE(write_one(3).ok());
  fs.SetNoSpace(false);
  EXPECT_TRUE(write_one(4).ok()) << "the journal did not recover when space came back";
  EXPECT_GE(j->Stats().errors, 2u);
}

TEST(Journal, GenerationGrowsWithEveryOpen) {
  TempDir tmp;
  uint64_t g1, g2;
  {
    std::unique_ptr<Journal> j;
    ASSERT_TRUE(Journal::Open({tmp / "j"}, &j).ok());
    g1 = j->generation();
  }
  {
    std::unique_ptr<Journal> j;
    ASSERT_TRUE(Journal::Open({tmp / "j"}, &j).ok());
    g2 = j->generation();
  }
  EXPECT_EQ(g2, g1 + 1);
}

}  // namespace
}  // namespace asrf
