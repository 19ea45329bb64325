// Scoped caching CPU allocator (csrc/cpu/memory_pool.cpp), driven from Python
// through fastcount._C (csrc/fastcount.cpp) by fastcount.inference.memory.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastcount {
namespace pool {

struct Stats {
  size_t idle_bytes;  // cached, free for reuse
  size_t live_bytes;  // handed out by the pool and not yet freed
  uint64_t hits, misses;
  int64_t depth;  // open scopes
  size_t limit;   // cap on idle_bytes
};

void enter();
void exit();
void release();
void set_limit(size_t bytes);
Stats stats();

}  // namespace pool
}  // namespace fastcount
