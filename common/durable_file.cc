#include "common/durable_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>

namespace asrf {

namespace fs = std::filesystem;

Status WriteFileDurably(const std::string& path, const std::string& bytes) {
  // A temporary name of this process's own (two workers sharing a folder must not write into one
  // file), synced before the rename and the folder after it: a power cut leaves the old file or
  // the whole new one, never a complete-looking part. The name is short whatever the final one's
  // length: a final name near the file system's 255-byte limit must still be writable.
  const fs::path parent = fs::path(path).parent_path();
  char name[64];
  std::snprintf(name, sizeof(name), ".asrf-%d-%08x.tmp", static_cast<int>(getpid()), std::random_device{}());
  std::string tmp = (parent.empty() ? fs::path(name) : parent / name).string();
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError("cannot create " + tmp + ": " + std::strerror(errno));
  size_t done = 0;
  errno = 0;
  while (done < bytes.size()) {
    ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  const int err = done < bytes.size() ? (errno ? errno : EIO) : (fsync(fd) != 0 ? errno : 0);
  close(fd);
  std::error_code ec;
  if (err != 0) {
    fs::remove(tmp, ec);
    return Status::IOError("cannot write " + tmp + ": " + std::strerror(err));
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    std::error_code rec;
    fs::remove(tmp, rec);
    return Status::IOError("cannot write " + path + ": " + ec.message());
  }
  if (int dfd = open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return Status::Ok();
}

}  // namespace asrf
