// Models from the registry: the newest version of a name, fetched from PostgreSQL, cached under
// STATE_DIR/models as NAME.vVERSION.pt (with NAME.vVERSION.sha256 beside it) and verified by its
// SHA-256 before use.
#pragma once

#include <string>

#include "common/status.h"

namespace asrf {

// Sets *path to a verified local copy of model `name`. With PostgreSQL reachable: the registry's
// newest version (a cached copy is used when its checksum matches, else it is fetched again).
// Without: the newest cached version whose checksum still matches, if any. Errors: NotFound (no
// such model), Unavailable (PostgreSQL unreachable and nothing cached), Corruption (bytes that do
// not match their checksum). *sha256, when given, is set to the copy's checksum (verified).
Status FetchRegistryModel(const std::string& conninfo, const std::string& name, const std::string& cache_dir,
                          std::string* path, std::string* sha256 = nullptr);

}  // namespace asrf
