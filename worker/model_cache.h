// Models from the registry: the newest version of a name, fetched from PostgreSQL, cached under
// STATE_DIR/models as NAME.vVERSION.pt (with NAME.vVERSION.sha256 beside it) and verified by its
// SHA-256 before use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace asrf {

// Sets *path to a verified local copy of model `name`. With PostgreSQL reachable: the registry's
// newest version (a cached copy is used when its checksum matches, else it is fetched again).
// Without: the newest cached version whose checksum still matches, if any. Errors: NotFound (no
// such model), Unavailable (PostgreSQL unreachable and nothing cached), Corruption (bytes that do
// not match their checksum), Invalid (a conninfo that can never work: unparsable, or holding a
// password; no cached copy hides that). *sha256, when given, is set to the copy's checksum
// (verified). statement_timeout_ms bounds each statement (a lock held elsewhere, a stalled server).
// Older cached versions are kept: the caller evicts them once this copy has loaded
// (EvictOlderCachedModels), so a new version that does not load leaves the last good one cached.
Status FetchRegistryModel(const std::string& conninfo, const std::string& name, const std::string& cache_dir,
                          std::string* path, std::string* sha256 = nullptr, int64_t statement_timeout_ms = 60000);

// The verified cached copies of `name` (NAME.vN.pt whose NAME.vN.sha256 matches), newest first.
struct CachedModel {
  int64_t version = 0;
  std::string path, sha256;
};
std::vector<CachedModel> CachedModels(const std::string& cache_dir, const std::string& name);

// Removes the cached versions of `name` older than the one at `path` (NAME.vN.pt): every import
// would otherwise leave one more copy of tens of MB. Only cache entries (a .pt with its .sha256
// beside it).
void EvictOlderCachedModels(const std::string& cache_dir, const std::string& name, const std::string& path);


}  // namespace asrf
