// SHA-256 (FIPS 180-4) of a byte string, as lowercase hex. Used to verify cached model files
// against the registry's checksum.
#pragma once

#include <string>
#include <string_view>

namespace asrf {

std::string Sha256Hex(std::string_view data);

}  // namespace asrf
